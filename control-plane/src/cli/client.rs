//! The CLI's HTTP client of the admin API. Its errors say what to fix: which setting names the
//! root key or the URL, and the API's own code and message.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use reqwest::Method;
use serde_json::Value;

use super::request::Request;

/// Long enough for a revoke that waits on regions (each call the control plane makes is
/// bounded by seconds), short enough that a silent server does not hang a script.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    url: String,
    root_key: String,
}

impl Client {
    /// Checks the settings before anything is sent (or read from stdin).
    pub fn new(url: &str, root_key: Option<String>) -> anyhow::Result<Client> {
        let Some(root_key) = root_key.filter(|k| !k.trim().is_empty()) else {
            bail!(
                "no root key: set KEYWARD_ROOT_KEY (or pass --root-key) to a root key, such as the one \
                 `keyward serve` printed when it created the database"
            );
        };
        let url = url.trim_end_matches('/').to_owned();
        let parsed = url::Url::parse(&url)
            .with_context(|| format!("`{url}` is not a URL; set KEYWARD_URL or --url to the control plane's"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            bail!("`{url}` is not an http(s) URL; set KEYWARD_URL or --url to the control plane's");
        }
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).timeout(TIMEOUT).build()?;
        Ok(Client { http, url, root_key })
    }

    /// Sends the request with the root key; answers the API's JSON, or an error that says what to fix.
    pub async fn call(&self, request: &Request) -> anyhow::Result<Value> {
        self.send(request.method.clone(), &request.path, request.body.as_ref()).await
    }

    /// `GET path` (encoded, with its query).
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(Method::GET, path, None).await
    }

    /// `POST path` without a body.
    pub async fn post(&self, path: &str) -> anyhow::Result<Value> {
        self.send(Method::POST, path, None).await
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut builder = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.root_key);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        let response = builder.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| self.unreachable(&e))?;
        let answer: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() {
            return answer.ok_or_else(|| {
                anyhow!(
                    "{} answered {status} with a body that is not JSON: is it the Keyward control plane? {}",
                    self.url,
                    SET_URL
                )
            });
        }
        let error = answer.as_ref().map(|a| &a["error"]);
        let (Some(code), Some(message)) =
            (error.and_then(|e| e["code"].as_str()), error.and_then(|e| e["message"].as_str()))
        else {
            bail!("{} answered {status} without a Keyward error: is it the Keyward control plane? {SET_URL}", self.url);
        };
        let hint = match status.as_u16() {
            401 => "\nCheck KEYWARD_ROOT_KEY (or --root-key): this control plane does not accept that root key.",
            403 => "\nUse a root key that holds this scope (`keyward root-keys list` shows each key's scopes).",
            _ => "",
        };
        bail!("{code} ({status}): {message}{hint}")
    }

    fn unreachable(&self, e: &reqwest::Error) -> anyhow::Error {
        // The innermost cause says it best ("Connection refused"); reqwest's own text repeats the URL.
        let mut cause: &dyn std::error::Error = e;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        if e.is_timeout() {
            anyhow!("the control plane at {} did not answer within {} s. {SET_URL}", self.url, TIMEOUT.as_secs())
        } else {
            anyhow!(
                "cannot reach the control plane at {} ({cause}). Is `keyward serve` running there? {SET_URL}",
                self.url
            )
        }
    }
}

const SET_URL: &str = "Set KEYWARD_URL or pass --url to point at another.";
