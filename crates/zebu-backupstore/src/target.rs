//! Backup target URLs and options: parsing `file:///path`, `s3://bucket/prefix`,
//! `az://container/prefix` and `gs://bucket/prefix` (with their options) into a [`Target`], the
//! one [`BackupStore`] the rest of Zebu holds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::s3::{S3Options, S3Store};
use crate::store::{BackupStore, FsStore, ObjectInfo, StoreError};

/// Options a target URL scheme accepts.
pub const S3_OPTIONS: &[&str] = &[
    "endpoint",
    "region",
    "access-key-id",
    "secret-access-key",
    "path-style",
    "ca-cert",
];

/// Options of `az://container/prefix` (Azure Blob Storage; `endpoint` for Azurite and the like).
pub const AZURE_OPTIONS: &[&str] = &["account", "access-key", "endpoint"];
/// Options of `gs://bucket/prefix` (Google Cloud Storage).
pub const GCS_OPTIONS: &[&str] = &["service-account-path", "service-account-key"];

/// Option names whose values are secrets (stored, never shown).
pub const SECRET_OPTIONS: &[&str] = &["secret-access-key", "access-key", "service-account-key"];

/// A parsed target location. Its `Debug` shows no option values (they may be secrets).
#[derive(Clone)]
pub enum TargetSpec {
    Fs(PathBuf),
    S3(S3Options),
    Azure {
        container: String,
        prefix: String,
        options: BTreeMap<String, String>,
    },
    Gcs {
        bucket: String,
        prefix: String,
        options: BTreeMap<String, String>,
    },
}

impl std::fmt::Debug for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetSpec::Fs(p) => write!(f, "Fs({})", p.display()),
            TargetSpec::S3(o) => write!(f, "S3({o:?})"),
            TargetSpec::Azure {
                container, prefix, ..
            } => write!(f, "Azure({container}/{prefix})"),
            TargetSpec::Gcs { bucket, prefix, .. } => write!(f, "Gcs({bucket}/{prefix})"),
        }
    }
}

/// Splits `rest` of `scheme://bucket/prefix` and checks the option names.
fn bucket_prefix<'a>(
    rest: &'a str,
    options: &BTreeMap<String, String>,
    known: &[&str],
    what: &str,
) -> Result<(&'a str, &'a str), TargetSpecError> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
    if !ok {
        return Err(bad(format!("{bucket:?} is not a valid {what} name")));
    }
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        crate::store::check_key(prefix)
            .map_err(|_| bad(format!("{prefix:?} is not a valid key prefix")))?;
    }
    for k in options.keys() {
        if !known.contains(&k.as_str()) {
            return Err(bad(format!(
                "unknown option {k:?} (known: {})",
                known.join(", ")
            )));
        }
    }
    Ok((bucket, prefix))
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TargetSpecError(pub String);

fn bad(msg: impl Into<String>) -> TargetSpecError {
    TargetSpecError(msg.into())
}

impl TargetSpec {
    /// Parses a target URL and its options; unknown schemes and options are errors.
    pub fn parse(
        url: &str,
        options: &BTreeMap<String, String>,
    ) -> Result<TargetSpec, TargetSpecError> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(format!(
                    "file target {url:?} needs an absolute path (file:///dir)"
                )));
            }
            if let Some(k) = options.keys().next() {
                return Err(bad(format!("option {k:?} does not apply to file targets")));
            }
            let path = path.trim_end_matches('/');
            return Ok(TargetSpec::Fs(PathBuf::from(if path.is_empty() {
                "/"
            } else {
                path
            })));
        }
        if let Some(rest) = url.strip_prefix("az://") {
            let (container, prefix) =
                bucket_prefix(rest, options, AZURE_OPTIONS, "Azure container")?;
            if !options.contains_key("account") {
                return Err(bad("an az:// target needs the option account=NAME"));
            }
            return Ok(TargetSpec::Azure {
                container: container.into(),
                prefix: prefix.into(),
                options: options.clone(),
            });
        }
        if let Some(rest) = url.strip_prefix("gs://") {
            let (bucket, prefix) = bucket_prefix(rest, options, GCS_OPTIONS, "GCS bucket")?;
            return Ok(TargetSpec::Gcs {
                bucket: bucket.into(),
                prefix: prefix.into(),
                options: options.clone(),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = bucket_prefix(rest, options, S3_OPTIONS, "S3 bucket")?;
            let get = |k: &str| options.get(k).cloned().unwrap_or_default();
            let path_style = match options.get("path-style").map(String::as_str) {
                None | Some("false") => false,
                Some("true") => true,
                Some(v) => return Err(bad(format!("path-style must be true or false, not {v:?}"))),
            };
            let endpoint = options.get("endpoint").cloned();
            if let Some(e) = &endpoint
                && !(e.starts_with("http://") || e.starts_with("https://"))
            {
                return Err(bad(format!(
                    "endpoint {e:?} must start with http:// or https://"
                )));
            }
            return Ok(TargetSpec::S3(S3Options {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
                endpoint,
                region: get("region"),
                access_key_id: get("access-key-id"),
                secret_access_key: get("secret-access-key"),
                path_style,
                ca_cert: options.get("ca-cert").map(PathBuf::from),
            }));
        }
        Err(bad(format!(
            "unsupported backup target URL {url:?} (use file:///path, s3://bucket/prefix, az://container/prefix or gs://bucket/prefix)"
        )))
    }

    /// Connects. `init` writes the target's marker when it is missing (creating a target);
    /// otherwise a target without one is unavailable.
    pub async fn open(&self, init: bool) -> Result<Target, StoreError> {
        match self {
            TargetSpec::Fs(p) => {
                let (p, init) = (p.clone(), init);
                let s = tokio::task::spawn_blocking(move || FsStore::open(&p, init))
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))??;
                Ok(Target::Fs(s))
            }
            TargetSpec::S3(o) => Ok(Target::S3(S3Store::open(o, init).await?)),
            TargetSpec::Azure {
                container,
                prefix,
                options,
            } => {
                use object_store::azure::MicrosoftAzureBuilder;
                let get = |k: &str| options.get(k).cloned().unwrap_or_default();
                let mut b = MicrosoftAzureBuilder::new()
                    .with_account(get("account"))
                    .with_container_name(container)
                    .with_retry(S3Store::retry());
                let mut client = S3Store::client_options();
                if let Some(k) = options.get("access-key") {
                    b = b.with_access_key(k);
                }
                if let Some(e) = options.get("endpoint") {
                    b = b.with_endpoint(e.clone());
                    client = client.with_allow_http(e.starts_with("http://"));
                }
                let store = b
                    .with_client_options(client)
                    .build()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let what = format!("Azure container {container}");
                Ok(Target::S3(
                    S3Store::open_with(std::sync::Arc::new(store), prefix, &what, init).await?,
                ))
            }
            TargetSpec::Gcs {
                bucket,
                prefix,
                options,
            } => {
                use object_store::gcp::GoogleCloudStorageBuilder;
                let mut b = GoogleCloudStorageBuilder::new()
                    .with_bucket_name(bucket)
                    .with_retry(S3Store::retry())
                    .with_client_options(S3Store::client_options());
                if let Some(p) = options.get("service-account-path") {
                    b = b.with_service_account_path(p);
                }
                if let Some(k) = options.get("service-account-key") {
                    b = b.with_service_account_key(k);
                }
                let store = b
                    .build()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let what = format!("GCS bucket {bucket}");
                Ok(Target::S3(
                    S3Store::open_with(std::sync::Arc::new(store), prefix, &what, init).await?,
                ))
            }
        }
    }
}

/// An open backup target of any supported kind.
#[derive(Debug, Clone)]
pub enum Target {
    Fs(FsStore),
    S3(S3Store),
}

impl BackupStore for Target {
    async fn put_if_absent(&self, key: &str, data: Vec<u8>) -> Result<bool, StoreError> {
        match self {
            Target::Fs(s) => s.put_if_absent(key, data).await,
            Target::S3(s) => s.put_if_absent(key, data).await,
        }
    }
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Target::Fs(s) => s.put(key, data).await,
            Target::S3(s) => s.put(key, data).await,
        }
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Target::Fs(s) => s.get(key).await,
            Target::S3(s) => s.get(key).await,
        }
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self {
            Target::Fs(s) => s.exists(key).await,
            Target::S3(s) => s.exists(key).await,
        }
    }
    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        match self {
            Target::Fs(s) => s.list_meta(prefix).await,
            Target::S3(s) => s.list_meta(prefix).await,
        }
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Target::Fs(s) => s.delete(key).await,
            Target::S3(s) => s.delete(key).await,
        }
    }
}

/// A backup manifest found in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub volume: String,
    pub backup: String,
    /// Changes whenever the manifest object is rewritten (empty: unknown).
    pub tag: String,
}

/// Every backup manifest in a target, from one listing of `volumes/` and one of
/// `backing-images/` (whose backups are listed under the owner `bi.<image>`).
pub async fn list_manifests<S: BackupStore>(store: &S) -> Result<Vec<ManifestEntry>, StoreError> {
    let mut out = Vec::new();
    for (prefix, image) in [("volumes", false), ("backing-images", true)] {
        let objects = store.list_meta(prefix).await?;
        out.extend(objects.into_iter().filter_map(|o| {
            let rest = o.key.strip_prefix(prefix)?.strip_prefix('/')?;
            let (owner, rest) = rest.split_once("/backups/")?;
            let b = rest.strip_suffix(".manifest")?;
            if owner.contains('/') || owner.contains('.') || b.contains('/') {
                return None;
            }
            Some(ManifestEntry {
                volume: if image {
                    zebu_types::image_owner(owner)
                } else {
                    owner.to_string()
                },
                backup: b.to_string(),
                tag: o.tag,
            })
        }));
    }
    Ok(out)
}

/// Every backup in a target as `(volume, backup)`, from the manifest keys.
pub async fn list_backups<S: BackupStore>(store: &S) -> Result<Vec<(String, String)>, StoreError> {
    Ok(list_manifests(store)
        .await?
        .into_iter()
        .map(|e| (e.volume, e.backup))
        .collect())
}

/// The option names a target URL's scheme accepts (`None`: not a known scheme).
pub fn options_for(url: &str) -> Option<&'static [&'static str]> {
    let scheme = url.split_once("://")?.0;
    match scheme {
        "file" => Some(&[]),
        "s3" => Some(S3_OPTIONS),
        "az" => Some(AZURE_OPTIONS),
        "gs" => Some(GCS_OPTIONS),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn urls_and_options_are_checked() {
        assert!(matches!(
            TargetSpec::parse("file:///var/backups/", &opts(&[])),
            Ok(TargetSpec::Fs(p)) if p.as_path() == std::path::Path::new("/var/backups")
        ));
        assert!(TargetSpec::parse("file://relative", &opts(&[])).is_err());
        assert!(TargetSpec::parse("file:///x", &opts(&[("region", "a")])).is_err());
        let s = TargetSpec::parse(
            "s3://my-bucket/some/prefix/",
            &opts(&[
                ("endpoint", "http://127.0.0.1:9000"),
                ("path-style", "true"),
            ]),
        );
        match s {
            Ok(TargetSpec::S3(o)) => {
                assert_eq!(o.bucket, "my-bucket");
                assert_eq!(o.prefix, "some/prefix");
                assert!(o.path_style);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(TargetSpec::parse("s3://B/x", &opts(&[])).is_err());
        assert!(TargetSpec::parse("s3://bucket", &opts(&[("colour", "red")])).is_err());
        assert!(TargetSpec::parse("s3://bucket", &opts(&[("path-style", "maybe")])).is_err());
        assert!(TargetSpec::parse("s3://bucket", &opts(&[("endpoint", "ftp://x")])).is_err());
        assert!(TargetSpec::parse("nfs://server/export", &opts(&[])).is_err());
        assert!(matches!(
            TargetSpec::parse("az://backups/zebu", &opts(&[("account", "acct")])),
            Ok(TargetSpec::Azure { .. })
        ));
        assert!(
            TargetSpec::parse("az://backups", &opts(&[])).is_err(),
            "needs an account"
        );
        assert!(matches!(
            TargetSpec::parse("gs://backups/zebu", &opts(&[])),
            Ok(TargetSpec::Gcs { .. })
        ));
        assert!(TargetSpec::parse("gs://backups", &opts(&[("region", "x")])).is_err());
        assert!(TargetSpec::parse("", &opts(&[])).is_err());
    }
}
