//! Allow and deny lists of client IP ranges and countries (a key's own, and its API's), the
//! decision whether they admit a client, and the API record that carries an API's policy to the
//! edge. Pure: parsing CIDR ranges and country codes needs no dependency.
//!
//! A policy refuses a client whose IP falls in a denied range or whose country is denied (deny
//! wins over allow); where an allow list is not empty, it admits only what it names. Under any
//! IP list a client without a usable IP is refused (fail closed); under an allow list of
//! countries, a client without a country is refused.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::KeyHash;
use crate::record::{DEFAULT_MAX_STALENESS_MS, RECORD_SCHEMA, RecordError};
use crate::usage::ClientInfo;

/// Most entries one list may hold.
pub const MAX_LIST_ENTRIES: usize = 64;

/// A range of IP addresses: an address and how many of its leading bits every member shares.
/// Written `10.0.0.0/8`, `2001:db8::/32`, or a bare address (all its bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The range's first address (bits past the prefix are zero), as 128 bits: an IPv4 range
    /// is kept apart by `v4`, never matched against IPv6 addresses.
    base: u128,
    prefix: u8,
    v4: bool,
}

/// Why a list entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("`{0}` is not an IP range (CIDR such as 10.0.0.0/8 or 2001:db8::/32, or an address)")]
    Cidr(String),
    #[error("`{0}` is not a country code (ISO 3166-1 alpha-2: two letters, such as DE; or T1, Tor)")]
    Country(String),
    #[error("a list holds at most {MAX_LIST_ENTRIES} entries")]
    TooMany,
    #[error("limit_override.percent is 1 to 100, not {0}")]
    Percent(u8),
}

fn bits(ip: IpAddr) -> (u128, bool) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), true),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (u128::from(u32::from(v4)), true),
            None => (u128::from(v6), false),
        },
    }
}

/// The mask of a range's `prefix` leading bits, for addresses of `width` bits.
fn mask(prefix: u8, width: u8) -> u128 {
    if prefix == 0 { 0 } else { (u128::MAX >> (128 - u32::from(width))) & !((1u128 << (width - prefix)) - 1) }
}

impl Cidr {
    /// Whether `ip` falls in this range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (value, v4) = bits(ip);
        v4 == self.v4 && value & mask(self.prefix, self.width()) == self.base
    }

    fn width(&self) -> u8 {
        if self.v4 { 32 } else { 128 }
    }
}

impl FromStr for Cidr {
    type Err = PolicyError;

    /// A range; the address's bits past the prefix must be zero (`10.1.0.0/8` is refused, as
    /// likely a typo for something else).
    fn from_str(text: &str) -> Result<Cidr, PolicyError> {
        let refused = || PolicyError::Cidr(text.to_owned());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let (base, v4) = match address.parse::<IpAddr>().map_err(|_| refused())? {
            IpAddr::V4(a) => (u128::from(u32::from(a)), true),
            IpAddr::V6(a) => (u128::from(a), false),
        };
        let width = if v4 { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 3 => {
                p.parse::<u8>().map_err(|_| refused())?
            }
            Some(_) => return Err(refused()),
            None => width,
        };
        if prefix > width || base & !mask(prefix, width) != 0 {
            return Err(refused());
        }
        // An IPv4-mapped range (`::ffff:10.0.0.0/104`) is the IPv4 range it maps, since a
        // mapped address is matched as IPv4. (A wider IPv6 range holds the whole mapped block
        // or none of it, and matches IPv6 addresses only, as `::/0` should.)
        const MAPPED: u128 = 0xffff << 32;
        if !v4 && prefix >= 96 && base & mask(96, 128) == MAPPED {
            return Ok(Cidr { base: base & u128::from(u32::MAX), prefix: prefix - 96, v4: true });
        }
        Ok(Cidr { base, prefix, v4 })
    }
}

impl fmt::Display for Cidr {
    /// `10.0.0.0/8`; IPv6 as its eight groups in hex, uncompressed (`2001:db8:0:0:0:0:0:0/32`):
    /// the standard library's shortest form costs the worker's upload more than it is worth.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.v4 {
            let [a, b, c, d] = (self.base as u32).to_be_bytes();
            write!(f, "{a}.{b}.{c}.{d}/{}", self.prefix)
        } else {
            for i in (0..8).rev() {
                let group = (self.base >> (i * 16)) as u16;
                write!(f, "{group:x}{}", if i == 0 { "/" } else { ":" })?;
            }
            write!(f, "{}", self.prefix)
        }
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An ISO 3166-1 alpha-2 country code, upper case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Country([u8; 2]);

impl Country {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("two ASCII letters")
    }
}

impl FromStr for Country {
    type Err = PolicyError;

    /// Two ASCII letters, either case, or Cloudflare's `T1` (Tor).
    fn from_str(text: &str) -> Result<Country, PolicyError> {
        match text.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && (b.is_ascii_alphabetic() || [*a, *b].eq_ignore_ascii_case(b"T1")) => {
                Ok(Country([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => Err(PolicyError::Country(text.to_owned())),
        }
    }
}

impl Serialize for Country {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Country {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Country, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A policy as one string, the form records carry it in (a JSON deserializer per nested type
/// and source costs the worker's upload, as for credits): space-separated entries, `+` allows
/// and `-` denies, a two-letter entry is a country and any other an IP range
/// (`-10.0.0.0/8 -RU +DE`).
pub mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Policy;

    pub fn write(policy: &Policy) -> String {
        let ips =
            policy.allow_ips.iter().map(|c| format!("+{c}")).chain(policy.deny_ips.iter().map(|c| format!("-{c}")));
        let countries = policy
            .allow_countries
            .iter()
            .map(|c| format!("+{}", c.as_str()))
            .chain(policy.deny_countries.iter().map(|c| format!("-{}", c.as_str())));
        ips.chain(countries).collect::<Vec<_>>().join(" ")
    }

    pub fn read(text: &str) -> Option<Policy> {
        let mut policy = Policy::default();
        for entry in text.split(' ').filter(|e| !e.is_empty()) {
            let (allow, rest) = match entry.as_bytes().first()? {
                b'+' => (true, &entry[1..]),
                b'-' => (false, &entry[1..]),
                _ => return None,
            };
            match (rest.len() == 2, allow) {
                (true, true) => policy.allow_countries.push(rest.parse().ok()?),
                (true, false) => policy.deny_countries.push(rest.parse().ok()?),
                (false, true) => policy.allow_ips.push(rest.parse().ok()?),
                (false, false) => policy.deny_ips.push(rest.parse().ok()?),
            }
        }
        Some(policy)
    }

    pub fn serialize<S: Serializer>(policy: &Policy, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&write(policy))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Policy, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        read(&text).ok_or_else(|| serde::de::Error::custom("a policy is `+|-<CIDR or country>` entries"))
    }
}

/// Allow and deny lists of IP ranges and countries. Empty lists admit everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_countries: Vec<Country>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_countries: Vec<Country>,
}

/// The client a policy is decided on: its address, if it had a usable one, and its country,
/// if it had one (`Err` when the one given is not a country code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    pub ip: Option<IpAddr>,
    pub country: Option<Result<Country, ()>>,
}

impl Client {
    /// The client the verify request names in `client`; when it names none (no `client`), the
    /// caller itself (`own_ip`, `own_country`). A named client's missing field is unknown, never
    /// the caller's (the caller is usually the API's own server, elsewhere); a field that does
    /// not parse is unusable, and refused wherever a list of its kind exists.
    pub fn of(named: Option<&ClientInfo>, own_ip: Option<&str>, own_country: Option<&str>) -> Client {
        let (ip, country) = match named {
            Some(c) => (c.ip.as_deref(), c.country.as_deref()),
            None => (own_ip, own_country),
        };
        let ip = ip.and_then(|t| t.trim().parse().ok());
        let country = country.map(|t| t.trim().parse::<Country>().map_err(|_| ()));
        Client { ip, country }
    }
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.allow_ips.is_empty()
            && self.deny_ips.is_empty()
            && self.allow_countries.is_empty()
            && self.deny_countries.is_empty()
    }

    /// Whether the lists admit `client`: no deny list names it, every allow list that is not
    /// empty names it, and it has a usable IP wherever an IP list exists.
    pub fn admits(&self, client: &Client) -> bool {
        let ip_lists = !self.allow_ips.is_empty() || !self.deny_ips.is_empty();
        let ip_ok = match client.ip {
            None => !ip_lists,
            Some(ip) => {
                !self.deny_ips.iter().any(|c| c.contains(ip))
                    && (self.allow_ips.is_empty() || self.allow_ips.iter().any(|c| c.contains(ip)))
            }
        };
        let country_lists = !self.allow_countries.is_empty() || !self.deny_countries.is_empty();
        let country_ok = match client.country {
            None => self.allow_countries.is_empty(),
            Some(Err(())) => !country_lists,
            Some(Ok(country)) => {
                !self.deny_countries.contains(&country)
                    && (self.allow_countries.is_empty() || self.allow_countries.contains(&country))
            }
        };
        ip_ok && country_ok
    }

    /// Whether going from `self` to `next` may refuse a client that was admitted: a deny entry
    /// added, an empty allow list given entries, or an allow entry removed from a list that
    /// keeps others (emptying an allow list admits everyone).
    pub fn is_tightened_by(&self, next: &Policy) -> bool {
        fn allow_narrowed<T: PartialEq>(old: &[T], new: &[T]) -> bool {
            !new.is_empty() && (old.is_empty() || old.iter().any(|e| !new.contains(e)))
        }
        fn deny_widened<T: PartialEq>(old: &[T], new: &[T]) -> bool {
            new.iter().any(|e| !old.contains(e))
        }
        deny_widened(&self.deny_ips, &next.deny_ips)
            || deny_widened(&self.deny_countries, &next.deny_countries)
            || allow_narrowed(&self.allow_ips, &next.allow_ips)
            || allow_narrowed(&self.allow_countries, &next.allow_countries)
    }

    /// Refuses lists over [`MAX_LIST_ENTRIES`].
    pub fn check(&self) -> Result<(), PolicyError> {
        let lengths =
            [self.allow_ips.len(), self.deny_ips.len(), self.allow_countries.len(), self.deny_countries.len()];
        if lengths.iter().any(|n| *n > MAX_LIST_ENTRIES) { Err(PolicyError::TooMany) } else { Ok(()) }
    }

    /// The bytes the lists take in memory, for [`crate::budget::Weigh`].
    pub fn heap_bytes(&self) -> usize {
        (self.allow_ips.len() + self.deny_ips.len()) * std::mem::size_of::<Cidr>()
            + (self.allow_countries.len() + self.deny_countries.len()) * 2
    }
}

/// An API-wide override that lowers every key's rate limits: each limit of a key of the API is
/// capped at `percent` of its `limit` (rounded down, at least 1) while it stands. Stored and
/// delivered with the API record; applied by holders and kept by each key's authority as a
/// [`crate::ratelimit::Cap`] (docs/design.md, The limit override).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverride {
    /// 1 to 100.
    pub percent: u8,
}

impl LimitOverride {
    pub fn check(&self) -> Result<(), PolicyError> {
        if (1..=100).contains(&self.percent) { Ok(()) } else { Err(PolicyError::Percent(self.percent)) }
    }
}

/// An API as the edge sees it: its policy and limit override, versioned like a key's record,
/// with an authority, a KV entry and edge copies of its own (see docs/design.md, Tightening
/// during an incident).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiRecord {
    pub schema: u32,
    pub id: String,
    pub workspace_id: String,
    /// Grows by one on every change; 0 only for an API with no record anywhere.
    pub version: u64,
    pub max_staleness_ms: u64,
    #[serde(default, skip_serializing_if = "Policy::is_empty", with = "as_text")]
    pub policy: Policy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_override: Option<LimitOverride>,
    pub updated_at: i64,
}

impl ApiRecord {
    /// The record of an API that never had one anywhere: an empty policy at version 0.
    pub fn none(id: &str) -> ApiRecord {
        ApiRecord {
            schema: RECORD_SCHEMA,
            id: id.to_owned(),
            workspace_id: String::new(),
            version: 0,
            max_staleness_ms: DEFAULT_MAX_STALENESS_MS,
            policy: Policy::default(),
            limit_override: None,
            updated_at: 0,
        }
    }

    /// The hash naming an API's record at the edge (memory, Cache API, KV, its authority):
    /// SHA-256 of `api:<id>`, which no key's text (`<prefix>_<base58>`) can hash to.
    pub fn hash_of(api_id: &str) -> KeyHash {
        KeyHash::of(&format!("api:{api_id}"))
    }

    /// The cap this record's limit override puts on its keys' rate limits.
    pub fn cap(&self) -> crate::ratelimit::Cap {
        crate::ratelimit::Cap { api_version: self.version, percent: self.limit_override.map_or(100, |o| o.percent) }
    }

    /// Whether going from `self` to `next` may refuse a verification that was admitted: the
    /// policy tightened, or the limit override set or lowered.
    pub fn is_tightened_by(&self, next: &ApiRecord) -> bool {
        let lowered = match (self.limit_override, next.limit_override) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(old), Some(new)) => new.percent < old.percent,
        };
        self.policy.is_tightened_by(&next.policy) || lowered
    }

    pub fn from_json(text: &str) -> Result<ApiRecord, RecordError> {
        let record: ApiRecord = serde_json::from_str(text)?;
        if record.schema != RECORD_SCHEMA {
            return Err(RecordError::UnknownSchema(record.schema));
        }
        Ok(record)
    }

    /// The bytes this record takes in memory beyond its own size.
    pub fn heap_bytes(&self) -> usize {
        self.id.len() + self.workspace_id.len() + self.policy.heap_bytes()
    }
}

impl crate::freshness::Versioned for ApiRecord {
    fn version(&self) -> u64 {
        self.version
    }
    /// No later version of an API record is bound to admit less: none is final.
    fn is_final(&self) -> bool {
        false
    }
}

/// Whether the key's own lists and its API's (when its record was found) admit `client`.
pub fn admits(key: &crate::KeyRecord, api: Option<&ApiRecord>, client: &Client) -> bool {
    key.policy.admits(client) && api.is_none_or(|api| api.policy.admits(client))
}

/// The KV key under which an API's record is stored.
pub fn kv_key_for_api(api_id: &str) -> String {
    format!("api:{}", ApiRecord::hash_of(api_id).to_hex())
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cidr_parsing() {
        for good in
            ["10.0.0.0/8", "0.0.0.0/0", "192.168.1.7", "192.168.1.7/32", "2001:db8::/32", "::/0", "::1", "fe80::/10"]
        {
            assert!(good.parse::<Cidr>().is_ok(), "{good}");
        }
        for bad in [
            "10.1.0.0/8",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/08x",
            "10.0.0/8",
            "2001:db8::1/32",
            "::/129",
            "",
            "/8",
            "x",
            "10.0.0.0/8/8",
            " 10.0.0.0/8",
        ] {
            assert!(matches!(bad.parse::<Cidr>(), Err(PolicyError::Cidr(_))), "{bad}");
        }
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("192.168.1.7").to_string(), "192.168.1.7/32");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8:0:0:0:0:0:0/32");
        assert_eq!(cidr("::1").to_string(), "0:0:0:0:0:0:0:1/128");
        for text in ["2001:db8::/32", "::1", "fe80::/10", "10.0.0.0/8", "0.0.0.0/0"] {
            assert_eq!(cidr(&cidr(text).to_string()), cidr(text), "{text}");
        }
        let json = serde_json::to_string(&vec![cidr("10.0.0.0/8")]).unwrap();
        assert_eq!(json, r#"["10.0.0.0/8"]"#);
        assert!(serde_json::from_str::<Vec<Cidr>>(r#"["10.0.0.1/8"]"#).is_err());
    }

    #[test]
    fn cidr_matching_table() {
        let rows: [(&str, &str, bool); 19] = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("10.0.0.0/8", "9.255.255.255", false),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "::1", true),
            ("::/0", "1.2.3.4", false),
            ("203.0.113.0/25", "203.0.113.127", true),
            ("203.0.113.0/25", "203.0.113.128", false),
            ("::1", "::1", true),
            ("fe80::/10", "febf::1", true),
            // A mapped range is the IPv4 range it maps, whichever way the address is written.
            ("::ffff:10.0.0.0/104", "10.1.2.3", true),
            ("::ffff:10.0.0.0/104", "::ffff:10.1.2.3", true),
            ("::ffff:10.0.0.0/104", "11.0.0.1", false),
        ];
        for (range, address, expected) in rows {
            assert_eq!(cidr(range).contains(ip(address)), expected, "{range} ∋ {address}");
        }
    }

    #[test]
    fn country_codes() {
        assert_eq!("de".parse::<Country>().unwrap().as_str(), "DE");
        assert_eq!("XX".parse::<Country>().unwrap().as_str(), "XX");
        assert_eq!("t1".parse::<Country>().unwrap().as_str(), "T1", "Cloudflare's Tor");
        for bad in ["", "D", "DEU", "1A", "É1", "d-", "R ", "R0", "A1"] {
            assert!(matches!(bad.parse::<Country>(), Err(PolicyError::Country(_))), "{bad}");
        }
    }

    fn policy(allow_ips: &[&str], deny_ips: &[&str], allow_countries: &[&str], deny_countries: &[&str]) -> Policy {
        Policy {
            allow_ips: allow_ips.iter().map(|c| cidr(c)).collect(),
            deny_ips: deny_ips.iter().map(|c| cidr(c)).collect(),
            allow_countries: allow_countries.iter().map(|c| c.parse().unwrap()).collect(),
            deny_countries: deny_countries.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn decision_table() {
        let none = Policy::default();
        let deny_net = policy(&[], &["10.0.0.0/8"], &[], &[]);
        let allow_net = policy(&["10.0.0.0/8"], &[], &[], &[]);
        let allow_and_deny = policy(&["10.0.0.0/8"], &["10.1.0.0/16"], &[], &[]);
        let deny_ru = policy(&[], &[], &[], &["RU"]);
        let allow_de = policy(&[], &[], &["DE"], &[]);
        let both = policy(&[], &["10.0.0.0/8"], &[], &["RU"]);
        type Row<'a> = (&'a str, &'a Policy, Option<&'a str>, Option<&'a str>, bool);
        let rows: [Row; 17] = [
            ("no lists, no client", &none, None, None, true),
            ("no lists", &none, Some("10.1.2.3"), Some("RU"), true),
            ("denied range", &deny_net, Some("10.1.2.3"), None, false),
            ("outside denied range", &deny_net, Some("11.1.2.3"), None, true),
            ("deny list, no IP: fail closed", &deny_net, None, None, false),
            ("allowed range", &allow_net, Some("10.9.9.9"), None, true),
            ("outside allowed range", &allow_net, Some("8.8.8.8"), None, false),
            ("allow list, no IP: fail closed", &allow_net, None, Some("DE"), false),
            ("deny wins over allow", &allow_and_deny, Some("10.1.0.1"), None, false),
            ("allowed, not denied", &allow_and_deny, Some("10.2.0.1"), None, true),
            ("denied country", &deny_ru, Some("1.1.1.1"), Some("RU"), false),
            ("other country", &deny_ru, Some("1.1.1.1"), Some("DE"), true),
            ("deny country, unknown country", &deny_ru, None, None, true),
            ("allowed country", &allow_de, None, Some("DE"), true),
            ("not an allowed country", &allow_de, None, Some("FR"), false),
            ("allow country, no country: fail closed", &allow_de, None, None, false),
            ("ip and country lists, ip denied", &both, Some("10.0.0.1"), Some("DE"), false),
        ];
        for (name, policy, address, country, expected) in rows {
            let client = Client { ip: address.map(ip), country: country.map(|c| Ok(c.parse().unwrap())) };
            assert_eq!(policy.admits(&client), expected, "{name}");
        }
    }

    fn named(ip: Option<&str>, country: Option<&str>) -> ClientInfo {
        ClientInfo { ip: ip.map(str::to_owned), country: country.map(str::to_owned), user_agent: None }
    }

    #[test]
    fn the_caller_stands_in_for_an_absent_client_only() {
        let deny = policy(&[], &["10.0.0.0/8"], &[], &["RU"]);
        let admits = |named: Option<ClientInfo>, own_ip, own_country| {
            deny.admits(&Client::of(named.as_ref(), own_ip, own_country))
        };
        assert!(!admits(None, Some("10.0.0.1"), None), "no client: the caller's address");
        assert!(!admits(None, Some("8.8.8.8"), Some("ru")), "no client: the caller's country");
        assert!(admits(Some(named(Some("8.8.8.8"), None)), Some("10.0.0.1"), None), "named wins");
        assert!(admits(Some(named(Some("8.8.8.8"), Some("DE"))), None, Some("RU")));
        // A named client without a country has an unknown country, not the caller's.
        assert!(admits(Some(named(Some("8.8.8.8"), None)), None, Some("RU")), "not the caller's country");
        // A named client without an IP has no usable IP: refused under an IP list.
        assert!(!admits(Some(named(None, Some("DE"))), Some("8.8.8.8"), None), "not the caller's IP");
        assert!(!admits(Some(named(Some("not an ip"), None)), Some("8.8.8.8"), None), "unusable named IP");
        // A country given that is not a code is refused under any country list, deny too.
        assert!(!admits(Some(named(Some("8.8.8.8"), Some("RUS"))), None, None), "unusable named country");
        assert!(admits(Some(named(Some("2001:db8::1"), None)), None, None));
        let allow_only = policy(&[], &[], &["DE"], &[]);
        assert!(!allow_only.admits(&Client::of(Some(&named(None, Some("??"))), None, None)));
        assert!(Policy::default().admits(&Client::of(Some(&named(Some("x"), Some("??"))), None, None)));
    }

    #[test]
    fn a_mapped_range_is_its_ipv4_range() {
        assert_eq!(cidr("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("::ffff:192.0.2.1").to_string(), "192.0.2.1/32");
    }

    #[test]
    fn tightening_table() {
        let base = policy(&["10.0.0.0/8"], &["10.1.0.0/16"], &["DE"], &["RU"]);
        type Row<'a> = (&'a str, Policy, bool);
        let rows: [Row; 8] = [
            ("same", base.clone(), false),
            ("deny ip added", policy(&["10.0.0.0/8"], &["10.1.0.0/16", "10.2.0.0/16"], &["DE"], &["RU"]), true),
            ("deny ip removed", policy(&["10.0.0.0/8"], &[], &["DE"], &["RU"]), false),
            ("deny country added", policy(&["10.0.0.0/8"], &["10.1.0.0/16"], &["DE"], &["RU", "KP"]), true),
            ("allow ip removed", policy(&[], &["10.1.0.0/16"], &["DE"], &["RU"]), false),
            ("allow ip narrowed", policy(&["10.0.0.0/16"], &["10.1.0.0/16"], &["DE"], &["RU"]), true),
            ("allow country added", policy(&["10.0.0.0/8"], &["10.1.0.0/16"], &["DE", "FR"], &["RU"]), false),
            ("allow country removed", policy(&["10.0.0.0/8"], &["10.1.0.0/16"], &[], &["RU"]), false),
        ];
        for (name, next, expected) in rows {
            assert_eq!(base.is_tightened_by(&next), expected, "{name}");
        }
        assert!(Policy::default().is_tightened_by(&policy(&["10.0.0.0/8"], &[], &[], &[])), "allow list given");
        assert!(Policy::default().is_tightened_by(&policy(&[], &[], &["DE"], &[])));
    }

    #[test]
    fn api_records() {
        let mut record = ApiRecord::none("api_1");
        record.version = 1;
        record.workspace_id = "ws_1".into();
        let text = serde_json::to_string(&record).unwrap();
        assert!(!text.contains("policy") && !text.contains("limit_override"), "{text}");
        assert_eq!(ApiRecord::from_json(&text).unwrap(), record);
        let mut next = record.clone();
        next.policy = policy(&[], &["10.0.0.0/8"], &[], &["RU"]);
        next.limit_override = Some(LimitOverride { percent: 50 });
        assert!(record.is_tightened_by(&next));
        assert!(!next.is_tightened_by(&record), "lifting loosens");
        let text = serde_json::to_string(&next).unwrap();
        assert!(text.contains(r#""policy":"-10.0.0.0/8 -RU""#), "{text}");
        assert_eq!(ApiRecord::from_json(&text).unwrap(), next);
        let mut lower = next.clone();
        lower.limit_override = Some(LimitOverride { percent: 10 });
        assert!(next.is_tightened_by(&lower));
        assert!(!lower.is_tightened_by(&next));
        assert!(LimitOverride { percent: 0 }.check().is_err());
        assert!(LimitOverride { percent: 101 }.check().is_err());
        assert!(LimitOverride { percent: 100 }.check().is_ok());
        assert_ne!(ApiRecord::hash_of("api_1"), KeyHash::of("api_1"));
        assert!(kv_key_for_api("api_1").starts_with("api:"));
        let future = text.replace("\"schema\":1", "\"schema\":2");
        assert!(matches!(ApiRecord::from_json(&future), Err(RecordError::UnknownSchema(2))));
    }

    #[test]
    fn policies_travel_as_text() {
        let full = policy(&["10.0.0.0/8", "2001:db8::/32"], &["10.1.0.0/16"], &["DE", "FR"], &["RU"]);
        let text = as_text::write(&full);
        assert_eq!(text, "+10.0.0.0/8 +2001:db8:0:0:0:0:0:0/32 -10.1.0.0/16 +DE +FR -RU");
        assert_eq!(as_text::read(&text), Some(full));
        assert_eq!(as_text::read(""), Some(Policy::default()));
        for bad in ["10.0.0.0/8", "+10.1.0.0/8", "-R", "+RUS", "*DE", "+ "] {
            assert_eq!(as_text::read(bad), None, "{bad}");
        }
    }

    #[test]
    fn lists_are_bounded() {
        let mut long = Policy { deny_countries: vec!["DE".parse().unwrap(); MAX_LIST_ENTRIES], ..Policy::default() };
        assert!(long.check().is_ok());
        long.deny_countries.push("FR".parse().unwrap());
        assert_eq!(long.check(), Err(PolicyError::TooMany));
    }
}
