//! The object-store backends of [`BackupStore`] through the object_store crate: S3 (and
//! S3-compatible servers), and any other object store handed to [`S3Store::open_with`] (Azure
//! Blob, Google Cloud Storage). Options come from the target, never from the process environment. Blocks are written with a
//! conditional PUT (`If-None-Match: *`), so an existing block is never overwritten.

use std::sync::Arc;

use futures::TryStreamExt;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig,
};

use crate::store::{BackupStore, LAYOUT_VERSION, MARKER, ObjectInfo, StoreError};

/// Where and how to reach a bucket. Its `Debug` leaves the secret out.
#[derive(Clone, Default)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`).
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub path_style: bool,
    /// PEM file with extra root certificates (a private CA).
    pub ca_cert: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("path_style", &self.path_style)
            .field("ca_cert", &self.ca_cert)
            .finish_non_exhaustive()
    }
}

/// Retries inside one request: a dead endpoint surfaces within seconds, not the crate's default
/// three minutes; the backup driver retries whole operations on top of this.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
    }
}

#[derive(Debug, Clone)]
pub struct S3Store {
    s3: Arc<dyn ObjectStore>,
    prefix: String,
}

fn io(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        key: key.to_string(),
        message: e.to_string(),
    }
}

impl S3Store {
    /// Client settings every backend shares: timeouts and the retry budget.
    pub fn client_options() -> ClientOptions {
        ClientOptions::new()
            .with_timeout(Duration::from_secs(30))
            .with_connect_timeout(Duration::from_secs(5))
    }

    pub fn retry() -> RetryConfig {
        retry_config()
    }

    /// Connects to a bucket. `init` writes the target marker when it is missing; otherwise a
    /// missing marker makes the target unavailable.
    pub async fn open(o: &S3Options, init: bool) -> Result<S3Store, StoreError> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&o.bucket)
            .with_region(if o.region.is_empty() {
                "us-east-1"
            } else {
                &o.region
            })
            .with_access_key_id(&o.access_key_id)
            .with_secret_access_key(&o.secret_access_key)
            .with_virtual_hosted_style_request(!o.path_style);
        let mut client = S3Store::client_options();
        if let Some(e) = &o.endpoint {
            b = b.with_endpoint(e);
            client = client.with_allow_http(e.starts_with("http://"));
        }
        if let Some(ca) = &o.ca_cert {
            let pem = std::fs::read(ca).map_err(|e| {
                StoreError::Unavailable(format!("reading CA certificate {}: {e}", ca.display()))
            })?;
            let cert = Certificate::from_pem(&pem).map_err(|e| {
                StoreError::Unavailable(format!("CA certificate {}: {e}", ca.display()))
            })?;
            client = client.with_root_certificate(cert);
        }
        b = b.with_client_options(client).with_retry(retry_config());
        let s3 = b
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        S3Store::open_with(
            Arc::new(s3),
            &o.prefix,
            &format!("bucket {}", o.bucket),
            init,
        )
        .await
    }

    /// Wraps any object store (Azure, GCS) the same way: `what` names it in errors.
    pub async fn open_with(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        what: &str,
        init: bool,
    ) -> Result<S3Store, StoreError> {
        let s = S3Store {
            s3: store,
            prefix: prefix.trim_matches('/').to_string(),
        };
        let marker = s.path(MARKER);
        match s.s3.get(&marker).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) if init => {
                let body = format!("{{\"layoutVersion\":{LAYOUT_VERSION}}}\n");
                s.s3.put(&marker, PutPayload::from(body.into_bytes()))
                    .await
                    .map_err(|e| io(MARKER, e))?;
            }
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::Unavailable(format!("{what} has no {MARKER}")));
            }
            Err(e) => return Err(StoreError::Unavailable(e.to_string())),
        }
        Ok(s)
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    async fn check_marker(&self) -> Result<(), StoreError> {
        match self.s3.head(&self.path(MARKER)).await {
            Ok(_) => Ok(()),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }
}

fn check(key: &str) -> Result<(), StoreError> {
    crate::store::check_key(key)
}

impl BackupStore for S3Store {
    async fn put_if_absent(&self, key: &str, data: Vec<u8>) -> Result<bool, StoreError> {
        check(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .s3
            .put_opts(&self.path(key), PutPayload::from(data), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        check(key)?;
        self.s3
            .put(&self.path(key), PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(|e| io(key, e))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check(key)?;
        self.check_marker().await?;
        match self.s3.get(&self.path(key)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| io(key, e))?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        check(key)?;
        match self.s3.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            check(prefix)?;
        }
        // A listing of an unreachable or uninitialised target is an error, never empty.
        self.check_marker().await?;
        let base = if prefix.is_empty() {
            (!self.prefix.is_empty()).then(|| Path::from(self.prefix.as_str()))
        } else {
            Some(self.path(prefix))
        };
        let metas: Vec<_> = self
            .s3
            .list(base.as_ref())
            .try_collect()
            .await
            .map_err(|e| io(prefix, e))?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.to_string().strip_prefix(&strip)?.to_string();
                (key != MARKER).then(|| ObjectInfo {
                    key,
                    size: m.size,
                    tag: m
                        .e_tag
                        .clone()
                        .unwrap_or_else(|| m.last_modified.timestamp_micros().to_string()),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        check(key)?;
        match self.s3.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io(key, e)),
        }
    }
}
