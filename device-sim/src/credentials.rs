//! Device credentials for the simulated connections.

use std::path::Path;

use anyhow::Context;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub id: String,
    pub secret: String,
    /// The CoAPS pre-shared key, when the device has one (`psk` column, hex).
    pub psk: Option<Vec<u8>>,
}

/// Reads a CSV with a header naming at least `id` and `secret` columns, and optionally `psk`
/// (extra columns are ignored), as `citygw device import --secrets-out` or `device-sim
/// provision` writes it.
pub fn load(path: &Path) -> anyhow::Result<Vec<Credential>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("credentials {}", path.display()))?;
    parse(file).with_context(|| format!("credentials {}", path.display()))
}

fn parse(reader: impl std::io::Read) -> anyhow::Result<Vec<Credential>> {
    let mut csv = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers = csv.headers()?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no `{name}` column in the header"))
    };
    let (id_col, secret_col) = (column("id")?, column("secret")?);
    let psk_col = column("psk").ok();
    let mut out = Vec::new();
    for (i, record) in csv.records().enumerate() {
        let record = record?;
        let field = |col: usize| record.get(col).unwrap_or_default().to_string();
        let (id, secret) = (field(id_col), field(secret_col));
        anyhow::ensure!(!id.is_empty(), "row {}: empty id", i + 2);
        let psk = match psk_col.map(field).filter(|p| !p.is_empty()) {
            Some(p) => {
                Some(hex::decode(&p).with_context(|| format!("row {}: psk is not hex", i + 2))?)
            }
            None => None,
        };
        out.push(Credential { id, secret, psk });
    }
    Ok(out)
}

/// The credentials for `n` connections: row i of the file, or `bench-{i}` with an empty
/// password when there is no file.
pub fn for_connections(file: Option<&Path>, n: usize) -> anyhow::Result<Vec<Credential>> {
    match file {
        Some(path) => {
            let mut creds = load(path)?;
            anyhow::ensure!(
                creds.len() >= n,
                "{} has {} credentials, {n} connections asked for",
                path.display(),
                creds.len()
            );
            creds.truncate(n);
            Ok(creds)
        }
        None => Ok((0..n)
            .map(|i| Credential {
                id: format!("bench-{i}"),
                secret: String::new(),
                psk: None,
            })
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_secrets_out_format() {
        let creds = parse("id,secret\ndev-1,abc\n dev-2 , xyz \n".as_bytes()).unwrap();
        assert_eq!(
            creds[1],
            Credential {
                id: "dev-2".into(),
                secret: "xyz".into(),
                psk: None,
            }
        );
        assert_eq!(creds.len(), 2);
    }

    #[test]
    fn extra_columns_and_order_do_not_matter() {
        let creds = parse("tenant,secret,id\nt,s1,d1\n".as_bytes()).unwrap();
        assert_eq!(
            creds,
            vec![Credential {
                id: "d1".into(),
                secret: "s1".into(),
                psk: None,
            }]
        );
    }

    #[test]
    fn psk_column_is_hex_and_optional_per_row() {
        let creds = parse("id,secret,psk\nd1,s1,6b6579\nd2,s2,\n".as_bytes()).unwrap();
        assert_eq!(creds[0].psk.as_deref(), Some(&b"key"[..]));
        assert_eq!(creds[1].psk, None);
        assert!(parse("id,secret,psk\nd1,s1,xyz\n".as_bytes()).is_err());
    }

    #[test]
    fn missing_column_is_an_error() {
        assert!(parse("id,tenant\nd1,t\n".as_bytes()).is_err());
    }

    #[test]
    fn anonymous_ids_without_file() {
        let creds = for_connections(None, 3).unwrap();
        assert_eq!(creds[2].id, "bench-2");
        assert!(creds[2].secret.is_empty());
    }
}
