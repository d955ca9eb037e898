//! Where and how the S3 sink writes: [`S3SinkConfig`] (bucket, prefix, format, multipart sizes,
//! addressing style), the object formats ([`S3Format`]), and the S3 client built from the standard
//! AWS configuration.

use aws_config::SdkConfig;

use super::Client;

/// Objects larger than this go up as multipart uploads (default 8 MiB, the AWS CLI's
/// `multipart_threshold`).
pub const DEFAULT_MULTIPART_THRESHOLD: usize = 8 * MIB;

/// Part size of multipart uploads (default 8 MiB, the AWS CLI's `multipart_chunksize`).
pub const DEFAULT_PART_SIZE: usize = 8 * MIB;

/// The smallest part S3 accepts, except for the last part of an upload
/// (<https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html>). LocalStack enforces it
/// too (`EntityTooSmall` at `CompleteMultipartUpload`).
pub const MIN_PART_SIZE: usize = 5 * MIB;

/// The largest part S3 accepts (5 GiB).
pub const MAX_PART_SIZE: usize = 5 * 1024 * MIB;

const MIB: usize = 1024 * 1024;

/// How events objects are written. The reader reads both, told apart by the key's extension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum S3Format {
    /// Parquet, typed columns, zstd pages (`.parquet`).
    #[default]
    Parquet,
    /// gzip-compressed JSON Lines, the event in canonical proto3 JSON (`.jsonl.gz`).
    JsonLinesGzip,
}

impl S3Format {
    /// The key's extension, without the leading dot.
    pub fn extension(self) -> &'static str {
        match self {
            S3Format::Parquet => "parquet",
            S3Format::JsonLinesGzip => "jsonl.gz",
        }
    }

    pub(super) fn content_type(self) -> &'static str {
        match self {
            S3Format::Parquet => "application/vnd.apache.parquet",
            // Not `Content-Encoding: gzip`: clients would unpack it on download and the object
            // would no longer be what its name says.
            S3Format::JsonLinesGzip => "application/gzip",
        }
    }

    pub(super) fn of_key(key: &str) -> Option<S3Format> {
        [S3Format::Parquet, S3Format::JsonLinesGzip]
            .into_iter()
            .find(|format| key.strip_suffix(format.extension()).is_some_and(|rest| rest.ends_with('.')))
    }
}

/// An S3 client from the standard AWS configuration. `force_path_style` puts the bucket in the path
/// (`http://host/bucket/key`) instead of the host name: what S3-compatible servers reached by IP
/// address or `localhost` (LocalStack, MinIO) need.
pub fn client(config: &SdkConfig, force_path_style: bool) -> Client {
    Client::from_conf(aws_sdk_s3::config::Builder::from(config).force_path_style(force_path_style).build())
}

/// Where and how an [`S3Sink`](super::S3Sink) writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3SinkConfig {
    bucket: String,
    prefix: String,
    format: S3Format,
    multipart_threshold: usize,
    part_size: usize,
    force_path_style: bool,
}

impl S3SinkConfig {
    /// Objects in `bucket` under `prefix` (leading and trailing slashes are dropped; empty for the
    /// bucket's root), as Parquet, multipart above 8 MiB in 8 MiB parts, virtual-host addressing.
    pub fn new(bucket: impl Into<String>, prefix: impl AsRef<str>) -> Self {
        S3SinkConfig {
            bucket: bucket.into(),
            prefix: prefix.as_ref().trim_matches('/').to_owned(),
            format: S3Format::default(),
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
            force_path_style: false,
        }
    }

    /// The format of events objects (default Parquet).
    pub fn with_format(mut self, format: S3Format) -> Self {
        self.format = format;
        self
    }

    /// Objects larger than this many bytes go up in parts (default 8 MiB; 0 sends every object
    /// through a multipart upload).
    pub fn with_multipart_threshold(mut self, bytes: usize) -> Self {
        self.multipart_threshold = bytes;
        self
    }

    /// Bytes per part of a multipart upload, 5 MiB to 5 GiB (default 8 MiB; values outside are
    /// moved to the nearest bound). Raised further for an object that would need more than
    /// 10,000 parts.
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.clamp(MIN_PART_SIZE, MAX_PART_SIZE);
        self
    }

    /// Path-style addressing for the client [`S3Sink::new`](super::S3Sink::new) builds (see [`client`]; default off).
    pub fn with_path_style(mut self, force_path_style: bool) -> Self {
        self.force_path_style = force_path_style;
        self
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn format(&self) -> S3Format {
        self.format
    }

    /// Whether the client [`S3Sink::new`](super::S3Sink::new) builds uses path-style addressing.
    pub fn path_style(&self) -> bool {
        self.force_path_style
    }

    pub fn multipart_threshold(&self) -> usize {
        self.multipart_threshold
    }

    pub fn part_size(&self) -> usize {
        self.part_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_stay_within_s3_limits() {
        let config = S3SinkConfig::new("b", "p");
        assert_eq!((config.multipart_threshold(), config.part_size()), (8 * MIB, 8 * MIB));
        assert_eq!(config.clone().with_part_size(1).part_size(), MIN_PART_SIZE);
        assert_eq!(config.clone().with_part_size(usize::MAX).part_size(), MAX_PART_SIZE);
        assert_eq!(config.with_multipart_threshold(0).multipart_threshold(), 0);
    }
}
