//! What a CoAP request asks for: the telemetry path, the access token and the payload format.

use coap_lite::{CoapOption, Packet};

use crate::codec::Format;

/// `/t/{device_id}[/{format}]`.
#[derive(Debug, PartialEq, Eq)]
pub struct TelemetryPath {
    pub device_id: String,
    pub format: Option<String>,
}

/// The Uri-Path segments, or `None` when one is not UTF-8.
pub fn path_segments(p: &Packet) -> Option<Vec<String>> {
    p.get_option(CoapOption::UriPath)
        .map(|segs| {
            segs.iter()
                .map(|s| String::from_utf8(s.clone()).ok())
                .collect::<Option<Vec<String>>>()
        })
        .unwrap_or_else(|| Some(Vec::new()))
}

pub fn telemetry_path(segments: &[String]) -> Option<TelemetryPath> {
    match segments {
        [t, id] if t == "t" && !id.is_empty() => Some(TelemetryPath {
            device_id: id.clone(),
            format: None,
        }),
        [t, id, f] if t == "t" && !id.is_empty() && !f.is_empty() => Some(TelemetryPath {
            device_id: id.clone(),
            format: Some(f.clone()),
        }),
        _ => None,
    }
}

/// The value of Uri-Query `key=value`, the first if repeated.
pub fn query<'a>(p: &'a Packet, key: &str) -> Option<&'a [u8]> {
    p.get_option(CoapOption::UriQuery)?.iter().find_map(|q| {
        q.strip_prefix(key.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
    })
}

/// The Content-Format option's number; `Err` when present but not a valid uint.
pub fn content_format(p: &Packet) -> Result<Option<u16>, ()> {
    match p.get_first_option(CoapOption::ContentFormat) {
        None => Ok(None),
        Some(v) if v.len() <= 2 => Ok(Some(v.iter().fold(0u16, |a, b| (a << 8) | u16::from(*b)))),
        Some(_) => Err(()),
    }
}

/// The payload format: a format named in the path wins; otherwise the Content-Format decides
/// (none: the gateway's JSON). `Err` names what was asked for but is not known.
pub fn format(path_format: Option<&str>, content_format: Option<u16>) -> Result<Format, String> {
    if let Some(name) = path_format {
        return Format::from_name(name).ok_or_else(|| name.to_string());
    }
    match content_format {
        None => Ok(Format::Json),
        // 60 is plain CBOR; the only CBOR the gateway decodes is SenML, so that is what it means.
        Some(60) => Ok(Format::SenmlCbor),
        Some(42) => Err(
            "application/octet-stream (content-format 42) needs a format in the path, e.g. /t/{device}/lpp"
                .to_string(),
        ),
        Some(n) => {
            Format::from_coap_content_format(n).ok_or_else(|| format!("content-format {n}"))
        }
    }
}

/// Options a request may carry; any other critical (odd-numbered) option is refused with 4.02,
/// as RFC 7252 section 5.4.1 requires.
const UNDERSTOOD_CRITICAL: &[u16] = &[1, 3, 5, 7, 11, 15, 17, 23, 27];

pub fn unknown_critical_option(p: &Packet) -> Option<u16> {
    p.options()
        .map(|(n, _)| *n)
        .find(|n| n % 2 == 1 && !UNDERSTOOD_CRITICAL.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let segs = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            telemetry_path(&segs(&["t", "a1"])),
            Some(TelemetryPath {
                device_id: "a1".into(),
                format: None
            })
        );
        assert_eq!(
            telemetry_path(&segs(&["t", "a1", "senml+cbor"]))
                .unwrap()
                .format,
            Some("senml+cbor".into())
        );
        for bad in [
            &["t"][..],
            &["t", ""],
            &["x", "a1"],
            &["t", "a", "b", "c"],
            &[],
        ] {
            assert_eq!(telemetry_path(&segs(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format(None, None), Ok(Format::Json));
        assert_eq!(format(None, Some(110)), Ok(Format::SenmlJson));
        assert_eq!(format(None, Some(112)), Ok(Format::SenmlCbor));
        assert_eq!(format(None, Some(60)), Ok(Format::SenmlCbor));
        assert_eq!(format(Some("senml+json"), Some(50)), Ok(Format::SenmlJson));
        assert!(format(None, Some(42)).unwrap_err().contains("/lpp"));
        assert_eq!(format(None, Some(0)), Err("content-format 0".into()));
        assert_eq!(format(Some("xml"), None), Err("xml".into()));
    }

    #[test]
    fn query_and_critical_options() {
        let mut p = Packet::new();
        p.add_option(CoapOption::UriQuery, b"x=1".to_vec());
        p.add_option(CoapOption::UriQuery, b"t=s3cret".to_vec());
        assert_eq!(query(&p, "t"), Some(&b"s3cret"[..]));
        assert_eq!(query(&p, "y"), None);
        assert_eq!(unknown_critical_option(&p), None);
        p.add_option(CoapOption::Unknown(2049), vec![]);
        assert_eq!(unknown_critical_option(&p), Some(2049));
    }
}
