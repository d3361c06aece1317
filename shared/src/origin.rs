//! The origin (`scheme://host[:port]`) of an `http` or `https` URL, as the WHATWG URL standard
//! serializes it for ASCII hosts: scheme and host lowercased, a default port (80, 443) left out,
//! path, query and fragment dropped. The edge stores its Cache API copies under its own origin
//! (`WORKER_URL`); this small parser keeps a full URL parser, with its IDNA tables, out of the
//! worker's upload. Anything it cannot vouch for (another scheme, user info, a non-ASCII or empty
//! host, a port that is not a number below 65536) is `None`.

/// The ASCII origin of `url`, or `None` when it is not a plain `http(s)://host[:port]...` URL.
pub fn origin_of(url: &str) -> Option<String> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#', '\\']).next().unwrap_or_default();
    if authority.contains('@') || !authority.is_ascii() {
        return None;
    }
    let (host, port) = split_port(authority)?;
    let valid_host = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '[' | ']' | ':');
    if host.is_empty() || !host.chars().all(valid_host) {
        return None;
    }
    let host = host.to_ascii_lowercase();
    Some(match port {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// Splits `host[:port]` (the host may be a bracketed IPv6 address); an empty port is none.
fn split_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let port_start = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => i,
        _ => return Some((authority, None)),
    };
    let (host, port) = (&authority[..port_start], &authority[port_start + 1..]);
    if port.is_empty() {
        return Some((host, None));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((host, Some(port.parse().ok()?)))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::origin_of;

    #[test]
    fn origins_as_the_url_standard_serializes_them() {
        let cases = [
            ("https://keyward.example.com", Some("https://keyward.example.com")),
            ("https://keyward.example.com/", Some("https://keyward.example.com")),
            ("https://Keyward.Example.COM/a/b?c=d#e", Some("https://keyward.example.com")),
            ("HTTPS://keyward.example.com", Some("https://keyward.example.com")),
            ("https://keyward.example.com:443/x", Some("https://keyward.example.com")),
            ("https://keyward.example.com:8443/x", Some("https://keyward.example.com:8443")),
            ("http://127.0.0.1:8787", Some("http://127.0.0.1:8787")),
            ("http://127.0.0.1:80/", Some("http://127.0.0.1")),
            ("http://localhost:/", Some("http://localhost")),
            ("http://[::1]:8787/", Some("http://[::1]:8787")),
            ("http://[::1]/", Some("http://[::1]")),
            ("  https://edge.example.com  ", Some("https://edge.example.com")),
        ];
        for (url, origin) in cases {
            assert_eq!(origin_of(url).as_deref(), origin, "{url}");
        }
    }

    #[test]
    fn what_it_cannot_vouch_for_is_none() {
        for url in [
            "",
            "keyward.example.com",
            "ftp://keyward.example.com",
            "https://",
            "https:///path",
            "https://user:pass@keyward.example.com",
            "https://keyward.example.com:99999",
            "https://keyward.example.com:80a",
            "https://bücher.example",
            "https://key ward.example.com",
        ] {
            assert_eq!(origin_of(url), None, "{url}");
        }
    }
}
