//! The HTTP writer: POSTs line protocol to an InfluxDB 2 compatible `/api/v2/write` or to an
//! InfluxDB 1.x `/write`, and says what the forwarder should do with the batch.
//!
//! | API | request | authentication |
//! |---|---|---|
//! | [`Api::V2`] | `POST {url}/api/v2/write?org=…&bucket=…&precision=ns` | `Authorization: Token …` |
//! | [`Api::V1`] | `POST {url}/write?db=…[&rp=…]&precision=ns` | HTTP basic, when a username is set |
//!
//! 1.x documents `n` for nanoseconds, but its write handler also accepts `ns` (and treats every
//! unit it does not know as nanoseconds); `ns` is what InfluxDB 2's 1.x-compatible `/write` and
//! VictoriaMetrics understand, so both modes send `precision=ns`.
//!
//! How an answer is classified ([`classify`]):
//!
//! | answer | outcome | why |
//! |---|---|---|
//! | 2xx | [`WriteOutcome::Ok`] | stored (InfluxDB answers 204) |
//! | network error, timeout | `Retry` | the store is down or slow |
//! | 429, 5xx | `Retry`, with `Retry-After` (seconds or HTTP date) when sent | overloaded or down |
//! | 400, 413, 422 | `Rejected`, with the store's message | the data itself: bad line, field type conflict, too large, outside retention; the forwarder splits the batch to isolate the bad points |
//! | 401, 403, 404, 408, other 4xx, 3xx, 1xx | `Retry` | configuration or transport (bad token, missing bucket or database, wrong URL): no point is at fault, so none may be dead-lettered; the retries and the error count by status make it visible until an operator fixes it |
//!
//! The token and the password are kept only inside a sensitive header value; neither the
//! [`Debug`](std::fmt::Debug) output nor any message carries them.

use std::fmt;
use std::io::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::Url;

pub use crate::sinks::WriteOutcome;

/// Which write API the store speaks.
#[derive(Clone, PartialEq, Eq)]
pub enum Api {
    /// InfluxDB 2 (and compatible stores: VictoriaMetrics, InfluxDB 3, Cloud).
    V2 {
        org: String,
        bucket: String,
        token: String,
    },
    /// InfluxDB 1.x `/write`.
    V1 {
        db: String,
        retention_policy: Option<String>,
        username: Option<String>,
        password: Option<String>,
    },
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Api::V2 { org, bucket, token } => f
                .debug_struct("V2")
                .field("org", org)
                .field("bucket", bucket)
                .field("token", &Redacted(!token.is_empty()))
                .finish(),
            Api::V1 {
                db,
                retention_policy,
                username,
                password,
            } => f
                .debug_struct("V1")
                .field("db", db)
                .field("retention_policy", retention_policy)
                .field("username", username)
                .field("password", &Redacted(password.is_some()))
                .finish(),
        }
    }
}

/// Shows whether a secret is set, never the secret.
struct Redacted(bool);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0 { "<redacted>" } else { "<none>" })
    }
}

/// Writes line protocol to one store.
#[derive(Clone)]
pub struct InfluxClient {
    http: reqwest::Client,
    /// The write endpoint with its query (org/bucket or db/rp, precision); holds no secret.
    write_url: Url,
    /// `Token …` or `Basic …`, marked sensitive.
    authorization: Option<HeaderValue>,
    gzip: bool,
    timeout: Duration,
}

impl fmt::Debug for InfluxClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InfluxClient")
            .field("write_url", &self.write_url.as_str())
            .field("authorization", &Redacted(self.authorization.is_some()))
            .field("gzip", &self.gzip)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl InfluxClient {
    /// A client for the store at `url` (`http://host:8086`, optionally with a path prefix when
    /// the store sits behind a reverse proxy). Only plain `http` is supported.
    pub fn new(url: &str, api: Api, gzip: bool, timeout: Duration) -> anyhow::Result<Self> {
        let write_url = write_url(url, &api)?;
        let authorization = authorization(&api)?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("citygw/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            write_url,
            authorization,
            gzip,
            timeout,
        })
    }

    /// POSTs a body of lines; never logs the token.
    pub async fn write(&self, lines: &str) -> WriteOutcome {
        let mut request = self
            .http
            .post(self.write_url.clone())
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::ACCEPT, "application/json");
        if let Some(auth) = &self.authorization {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        request = if self.gzip {
            match gzip(lines.as_bytes()) {
                Ok(body) => request.header(header::CONTENT_ENCODING, "gzip").body(body),
                // Compressing into memory cannot fail short of allocation failure; send it plain.
                Err(_) => request.body(lines.to_owned()),
            }
        } else {
            request.body(lines.to_owned())
        };

        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return transport_error(&e, self.timeout),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        // Read the body even on success, so the connection can be reused.
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) if (200..300).contains(&status) => {
                tracing::debug!(error = %e.without_url(), "reading a success body failed");
                Default::default()
            }
            Err(e) => return transport_error(&e, self.timeout),
        };
        classify(status, &headers, &body, SystemTime::now())
    }
}

/// `{url}/api/v2/write?…` or `{url}/write?…`, keeping any path prefix of `url`.
fn write_url(base: &str, api: &Api) -> anyhow::Result<Url> {
    let mut url = Url::parse(base).with_context(|| format!("invalid store URL {base:?}"))?;
    match url.scheme() {
        "http" => {}
        "https" => bail!(
            "store URL {base:?}: https is not supported (plain http only); \
             put a TLS-terminating proxy on this host in front of the store"
        ),
        other => bail!("store URL {base:?}: scheme {other:?} is not http"),
    }
    if !url.username().is_empty() || url.password().is_some() {
        bail!("store URL: put credentials in the sink's token/username/password settings, not in the URL");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("store URL {base:?}: no query or fragment allowed");
    }
    {
        let mut path = url
            .path_segments_mut()
            .map_err(|()| anyhow::anyhow!("store URL {base:?} cannot be a base"))?;
        path.pop_if_empty();
        match api {
            Api::V2 { .. } => path.extend(["api", "v2", "write"]),
            Api::V1 { .. } => path.extend(["write"]),
        };
    }
    {
        let mut q = url.query_pairs_mut();
        match api {
            Api::V2 { org, bucket, .. } => {
                if bucket.is_empty() {
                    bail!("InfluxDB 2 API: the bucket must be set");
                }
                q.append_pair("org", org).append_pair("bucket", bucket);
            }
            Api::V1 {
                db,
                retention_policy,
                ..
            } => {
                if db.is_empty() {
                    bail!("InfluxDB 1.x API: the database (db) must be set");
                }
                q.append_pair("db", db);
                if let Some(rp) = retention_policy.as_deref().filter(|rp| !rp.is_empty()) {
                    q.append_pair("rp", rp);
                }
            }
        }
        q.append_pair("precision", "ns");
    }
    Ok(url)
}

/// The Authorization header value, marked sensitive so that it is never printed.
fn authorization(api: &Api) -> anyhow::Result<Option<HeaderValue>> {
    let value = match api {
        Api::V2 { token, .. } if token.is_empty() => return Ok(None),
        Api::V2 { token, .. } => format!("Token {token}"),
        Api::V1 {
            username: Some(user),
            password,
            ..
        } => {
            let pair = format!("{user}:{}", password.as_deref().unwrap_or(""));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        }
        Api::V1 { .. } => return Ok(None),
    };
    // Deliberately no detail: the error must not echo the secret.
    let mut value = HeaderValue::from_str(&value).map_err(|_| {
        anyhow::anyhow!("the token or credentials contain characters not allowed in an HTTP header")
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// gzip at the fastest level: line protocol compresses well even so, and the forwarder's CPU is
/// shared with ingestion.
fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(body)?;
    enc.finish()
}

/// A failure before any HTTP answer: always worth retrying.
fn transport_error(e: &reqwest::Error, timeout: Duration) -> WriteOutcome {
    let message = if e.is_timeout() {
        format!("no answer within {timeout:?}")
    } else {
        error_chain(e)
    };
    WriteOutcome::Retry {
        status: None,
        retry_after: None,
        message,
    }
}

/// The error and its causes, without the URL (it is known from the sink's name).
fn error_chain(e: &reqwest::Error) -> String {
    let mut message = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        let text = if std::ptr::eq(
            err as *const dyn std::error::Error as *const u8,
            e as *const reqwest::Error as *const u8,
        ) {
            // reqwest's own text would repeat the URL.
            if e.is_connect() {
                "connection failed".to_string()
            } else if e.is_request() {
                "request failed".to_string()
            } else if e.is_body() {
                "body failed".to_string()
            } else {
                "HTTP error".to_string()
            }
        } else {
            err.to_string()
        };
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
        source = err.source();
    }
    message
}

/// What the forwarder should do with a batch, from the store's answer.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8], now: SystemTime) -> WriteOutcome {
    match status {
        200..=299 => WriteOutcome::Ok,
        400 | 413 | 422 => WriteOutcome::Rejected {
            status,
            message: error_message(status, headers, body),
        },
        _ => WriteOutcome::Retry {
            status: Some(status),
            retry_after: headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now)),
            message: error_message(status, headers, body),
        },
    }
}

/// `Retry-After`: delay seconds (`120`) or an HTTP date (`Wed, 21 Oct 2015 07:28:00 GMT`,
/// also the obsolete RFC 850 and asctime forms). A date in the past means "now" (zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // A number too large for u64 is still "a long time".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Longest message kept from an error body.
const MAX_MESSAGE: usize = 1024;

/// The store's explanation: `message` of InfluxDB 2's `{"code":…,"message":…}`, `error` of
/// 1.x's `{"error":…}`, else the plain body (VictoriaMetrics answers in text), else the
/// `X-Influxdb-Error` header, else the status's reason phrase. At most 1 KiB.
pub fn error_message(status: u16, headers: &HeaderMap, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let from_json = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| {
            ["message", "error"]
                .iter()
                .find_map(|k| v.get(k).and_then(|m| m.as_str()).map(str::to_owned))
        })
        .filter(|m| !m.trim().is_empty());
    let message = match from_json {
        Some(m) => m,
        None if !text.is_empty() => text.to_owned(),
        None => headers
            .get("x-influxdb-error")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.trim().is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let reason = reqwest::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("no explanation");
                format!("HTTP {status} {reason}")
            }),
    };
    truncate(message.trim(), MAX_MESSAGE)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2() -> Api {
        Api::V2 {
            org: "city org".into(),
            bucket: "telemetry".into(),
            token: "s3cr3t-token==".into(),
        }
    }

    fn v1(user: Option<&str>, password: Option<&str>, rp: Option<&str>) -> Api {
        Api::V1 {
            db: "citygw".into(),
            retention_policy: rp.map(Into::into),
            username: user.map(Into::into),
            password: password.map(Into::into),
        }
    }

    fn now() -> SystemTime {
        // 2026-01-01T00:00:00Z
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn v2_url() {
        let u = write_url("http://127.0.0.1:8428", &v2()).unwrap();
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:8428/api/v2/write?org=city+org&bucket=telemetry&precision=ns"
        );
        // A path prefix (reverse proxy) is kept, with or without trailing slash; IPv6 works.
        let u = write_url("http://[::1]:8086/influx/", &v2()).unwrap();
        assert_eq!(
            u.as_str(),
            "http://[::1]:8086/influx/api/v2/write?org=city+org&bucket=telemetry&precision=ns"
        );
    }

    #[test]
    fn v1_url() {
        let u = write_url("http://localhost:8086", &v1(None, None, None)).unwrap();
        assert_eq!(
            u.as_str(),
            "http://localhost:8086/write?db=citygw&precision=ns"
        );
        let u = write_url("http://localhost:8086/", &v1(None, None, Some("one year"))).unwrap();
        assert_eq!(
            u.as_str(),
            "http://localhost:8086/write?db=citygw&rp=one+year&precision=ns"
        );
        let u = write_url("http://localhost:8086", &v1(None, None, Some(""))).unwrap();
        assert!(!u.as_str().contains("rp="));
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in [
            "https://influx:8086",
            "ftp://influx",
            "not a url",
            "http://user:pw@influx:8086",
            "http://influx:8086/?x=1",
        ] {
            assert!(write_url(url, &v2()).is_err(), "{url}");
        }
        let no_bucket = Api::V2 {
            org: "o".into(),
            bucket: String::new(),
            token: "t".into(),
        };
        assert!(write_url("http://influx", &no_bucket).is_err());
        let no_db = Api::V1 {
            db: String::new(),
            retention_policy: None,
            username: None,
            password: None,
        };
        assert!(write_url("http://influx", &no_db).is_err());
    }

    #[test]
    fn authorization_headers() {
        let h = authorization(&v2()).unwrap().unwrap();
        assert_eq!(h.to_str().unwrap(), "Token s3cr3t-token==");
        assert!(h.is_sensitive());
        // "admin:pw" in base64.
        let h = authorization(&v1(Some("admin"), Some("pw"), None))
            .unwrap()
            .unwrap();
        assert_eq!(h.to_str().unwrap(), "Basic YWRtaW46cHc=");
        assert!(h.is_sensitive());
        assert!(authorization(&v1(None, Some("pw"), None))
            .unwrap()
            .is_none());
        assert!(authorization(&v1(None, None, None)).unwrap().is_none());
        let empty = Api::V2 {
            org: "o".into(),
            bucket: "b".into(),
            token: String::new(),
        };
        assert!(authorization(&empty).unwrap().is_none());
        // A bad token is refused without being echoed.
        let bad = Api::V2 {
            org: "o".into(),
            bucket: "b".into(),
            token: "line\nbreak-secret".into(),
        };
        let err = format!("{:#}", authorization(&bad).unwrap_err());
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let client =
            InfluxClient::new("http://127.0.0.1:8086", v2(), true, Duration::from_secs(5)).unwrap();
        let text = format!("{client:?} {:?}", v2());
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        assert!(text.contains("bucket=telemetry"), "{text}");
        let api = v1(Some("admin"), Some("hunter2"), None);
        let client = InfluxClient::new(
            "http://127.0.0.1:8086",
            api.clone(),
            false,
            Duration::from_secs(5),
        )
        .unwrap();
        let text = format!("{client:?} {api:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("YWRta"),
            "{text}"
        );
        assert!(text.contains("admin"), "{text}");
    }

    #[test]
    fn classify_success() {
        for status in [200, 204] {
            assert_eq!(
                classify(status, &HeaderMap::new(), b"", now()),
                WriteOutcome::Ok
            );
        }
    }

    #[test]
    fn classify_data_errors_are_rejected_with_the_message() {
        let body = br#"{"error":"partial write: field type conflict: input field \"value\" on measurement \"temperature\" is type string, already exists as type float dropped=1"}"#;
        assert_eq!(
            classify(400, &HeaderMap::new(), body, now()),
            WriteOutcome::Rejected {
                status: 400,
                message: "partial write: field type conflict: input field \"value\" on measurement \"temperature\" is type string, already exists as type float dropped=1".into(),
            }
        );
        let body = br#"{"code":"invalid","message":"unable to parse 'x y': invalid field format"}"#;
        assert_eq!(
            classify(400, &HeaderMap::new(), body, now()),
            WriteOutcome::Rejected {
                status: 400,
                message: "unable to parse 'x y': invalid field format".into(),
            }
        );
        let body = br#"{"code":"request too large","message":"unable to read data: points batch is too large","maxLength":5000}"#;
        assert!(matches!(
            classify(413, &HeaderMap::new(), body, now()),
            WriteOutcome::Rejected { status: 413, .. }
        ));
        assert!(matches!(
            classify(422, &HeaderMap::new(), b"", now()),
            WriteOutcome::Rejected { status: 422, .. }
        ));
    }

    #[test]
    fn classify_retryable() {
        let h = headers(&[("retry-after", "30")]);
        assert_eq!(
            classify(
                429,
                &h,
                br#"{"code":"too many requests","message":"slow down"}"#,
                now()
            ),
            WriteOutcome::Retry {
                status: Some(429),
                retry_after: Some(Duration::from_secs(30)),
                message: "slow down".into(),
            }
        );
        let h = headers(&[("retry-after", "Thu, 01 Jan 2026 00:01:00 GMT")]);
        assert_eq!(
            classify(503, &h, b"", now()),
            WriteOutcome::Retry {
                status: Some(503),
                retry_after: Some(Duration::from_secs(60)),
                message: "HTTP 503 Service Unavailable".into(),
            }
        );
        for status in [500, 502, 504] {
            assert!(matches!(
                classify(status, &HeaderMap::new(), b"oops", now()),
                WriteOutcome::Retry { status: Some(s), retry_after: None, .. } if s == status
            ));
        }
    }

    #[test]
    fn classify_configuration_errors_retry_instead_of_dead_lettering() {
        // A revoked token or a missing bucket is no fault of the points: never split and
        // dead-letter a backlog for it.
        let body = br#"{"code":"unauthorized","message":"unauthorized access"}"#;
        for status in [401, 403, 404, 405, 408, 301, 100] {
            match classify(status, &HeaderMap::new(), body, now()) {
                WriteOutcome::Retry {
                    status: Some(s),
                    message,
                    ..
                } => {
                    assert_eq!(s, status);
                    assert_eq!(message, "unauthorized access");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        let body = br#"{"error":"database not found: \"citygw\""}"#;
        assert_eq!(
            classify(404, &HeaderMap::new(), body, now()),
            WriteOutcome::Retry {
                status: Some(404),
                retry_after: None,
                message: "database not found: \"citygw\"".into(),
            }
        );
    }

    #[test]
    fn retry_after_forms() {
        let n = now();
        assert_eq!(parse_retry_after("0", n), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(" 120 ", n),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", n),
            Some(Duration::from_secs(u64::MAX))
        );
        // IMF-fixdate, RFC 850, asctime.
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:02:00 GMT", n),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Thursday, 01-Jan-26 00:00:05 GMT", n),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Thu Jan  1 00:00:10 2026", n),
            Some(Duration::from_secs(10))
        );
        // In the past: now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", n),
            Some(Duration::ZERO)
        );
        for bad in [
            "",
            "-5",
            "1.5",
            "soon",
            "30s",
            "Thu, 32 Jan 2026 00:00:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, n), None, "{bad:?}");
        }
    }

    #[test]
    fn error_messages() {
        let none = HeaderMap::new();
        // VictoriaMetrics answers in plain text.
        assert_eq!(
            error_message(
                400,
                &none,
                b"  cannot parse line \"x\": missing field value\n"
            ),
            "cannot parse line \"x\": missing field value"
        );
        // JSON without a known key: kept as is.
        assert_eq!(error_message(400, &none, br#"{"x":1}"#), r#"{"x":1}"#);
        // Empty body: the X-Influxdb-Error header, then the reason phrase.
        let h = headers(&[("x-influxdb-error", "timeout")]);
        assert_eq!(error_message(500, &h, b""), "timeout");
        assert_eq!(error_message(502, &none, b""), "HTTP 502 Bad Gateway");
        assert_eq!(error_message(599, &none, b""), "HTTP 599 no explanation");
        // Long bodies are cut on a character boundary.
        let long = "Đ".repeat(2000);
        let m = error_message(400, &none, long.as_bytes());
        assert!(m.len() <= MAX_MESSAGE + '…'.len_utf8() && m.ends_with('…'));
        // Invalid UTF-8 does not panic.
        assert!(!error_message(400, &none, &[0xff, 0xfe, b'x']).is_empty());
    }

    #[test]
    fn gzip_round_trip() {
        use std::io::Read as _;
        let body = "temperature,device=a value=1.5 1\n".repeat(1000);
        let packed = gzip(body.as_bytes()).unwrap();
        assert!(packed.len() < body.len() / 10);
        let mut out = String::new();
        flate2::read::GzDecoder::new(&packed[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, body);
    }

    #[tokio::test]
    async fn unreachable_store_is_retry() {
        // A port nothing listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = InfluxClient::new(
            &format!("http://127.0.0.1:{port}"),
            v2(),
            true,
            Duration::from_secs(2),
        )
        .unwrap();
        match client.write("m value=1.0 1\n").await {
            WriteOutcome::Retry {
                status: None,
                retry_after: None,
                message,
            } => {
                assert!(!message.contains("s3cr3t"), "{message}");
                assert!(message.starts_with("connection failed"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
