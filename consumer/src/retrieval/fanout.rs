//! Enhanced fan-out: reading a shard through `SubscribeToShard` pushes instead of polling
//! `GetRecords`.
//!
//! A stream consumer is registered once per application ([`register_consumer`], idempotent, safe
//! to race with other workers) and gets its own 2 MiB/s per shard. A [`FanOutReader`] then holds
//! one subscription to one shard at a time: each [`read`](FanOutReader::read) waits for the
//! subscription's next event and returns its records, deaggregated by the same code as the
//! polling [`ShardReader`] (`RecordConverter`). Subscriptions last at most 5 minutes;
//! when one ends, fails or is dropped, the reader subscribes again from where the last returned
//! event left off (its continuation sequence number, `AFTER_SEQUENCE_NUMBER`), so nothing is lost
//! and nothing repeated. Before the first event, a resumed checkpoint inside an aggregate is
//! exact, as with polling: `AT_SEQUENCE_NUMBER` and the delivered sub-records skipped.
//!
//! The service allows one `SubscribeToShard` call per second per shard and consumer and one open
//! subscription per shard and consumer (a second one is refused with `ResourceInUseException`);
//! the reader keeps its calls a second apart and backs off exponentially after failures. A closed
//! shard read to its end sends a last event without a continuation sequence number, naming the
//! child shards: [`ReadResult::shard_end`] is set, as with polling.

use std::cmp::Ordering;
use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::subscribe_to_shard::{SubscribeToShardError, SubscribeToShardOutput};
use aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError;
use aws_sdk_kinesis::types::{ConsumerDescription, ConsumerStatus, ShardIteratorType, SubscribeToShardEvent};
use aws_sdk_kinesis::types::{StartingPosition as SdkStartingPosition, SubscribeToShardEventStream};
use ktk_proto::keys::HashKeyRange;
use tokio::time::Instant;

#[cfg(doc)]
use crate::retrieval::ShardReader;
use crate::retrieval::polling::{IteratorStart, RecordConverter};
use crate::retrieval::{ReadResult, RetrievalError, StartingPosition};

/// How long a subscription lasts before the service ends it
/// ([SubscribeToShard](https://docs.aws.amazon.com/kinesis/latest/APIReference/API_SubscribeToShard.html)).
pub const SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(300);
/// `SubscribeToShard` calls allowed per second per shard and consumer: the reader keeps its calls
/// this far apart.
pub const SUBSCRIBE_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The service sends an event at least every 5 seconds, records or not; this long without one
/// means the subscription is dead.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Registered consumers a stream can have
/// ([RegisterStreamConsumer](https://docs.aws.amazon.com/kinesis/latest/APIReference/API_RegisterStreamConsumer.html)).
pub const MAX_CONSUMERS_PER_STREAM: usize = 20;
/// How long [`register_consumer`] waits for a consumer to become `ACTIVE`.
pub const CONSUMER_ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// A registered stream consumer: what a [`FanOutReader`] subscribes as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConsumer {
    pub stream_arn: String,
    pub consumer_name: String,
    pub consumer_arn: String,
    pub created: Option<SystemTime>,
}

impl From<&ConsumerDescription> for StreamConsumer {
    fn from(description: &ConsumerDescription) -> Self {
        StreamConsumer {
            stream_arn: description.stream_arn().to_owned(),
            consumer_name: description.consumer_name().to_owned(),
            consumer_arn: description.consumer_arn().to_owned(),
            created: SystemTime::try_from(*description.consumer_creation_timestamp()).ok(),
        }
    }
}

/// Why registering or deregistering a stream consumer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistrationError {
    #[error("stream {stream:?} not found: {message}; check the stream name and the AWS region")]
    StreamNotFound { stream: String, message: String },
    #[error(
        "not allowed to call {action} for stream {stream:?}: {message}; enhanced fan-out needs \
         kinesis:DescribeStreamSummary, kinesis:DescribeStreamConsumer, kinesis:RegisterStreamConsumer \
         (and kinesis:DeregisterStreamConsumer to remove it)"
    )]
    AccessDenied { stream: String, action: &'static str, message: String },
    #[error(
        "consumer {consumer:?} of stream {stream:?} is {status} after waiting {waited:?} for it to become \
         ACTIVE; try again later, or look at it with `aws kinesis describe-stream-consumer`"
    )]
    NotActive { stream: String, consumer: String, status: String, waited: Duration },
    #[error(
        "Kinesis refused {action} for stream {stream:?}: {message}; a stream has at most \
         {MAX_CONSUMERS_PER_STREAM} registered consumers and registrations are limited to 5 a second: \
         deregister unused consumers (`aws kinesis list-stream-consumers`) or try again later"
    )]
    LimitExceeded { stream: String, action: &'static str, message: String },
    #[error("Kinesis {action} for stream {stream:?} failed: {code}: {message}")]
    Service { stream: String, action: &'static str, code: String, message: String, retryable: bool },
}

impl RegistrationError {
    /// Whether making the same call again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistrationError::NotActive { .. } | RegistrationError::LimitExceeded { .. } => true,
            RegistrationError::StreamNotFound { .. } | RegistrationError::AccessDenied { .. } => false,
            RegistrationError::Service { retryable, .. } => *retryable,
        }
    }
}

/// Registers `consumer_name` on the stream unless it is registered already, and waits (at most
/// [`CONSUMER_ACTIVE_TIMEOUT`]) until it is `ACTIVE`. Safe to call from many workers at once.
pub async fn register_consumer(
    client: &aws_sdk_kinesis::Client,
    stream_name: &str,
    consumer_name: &str,
) -> Result<StreamConsumer, RegistrationError> {
    register_consumer_with_timeout(client, stream_name, consumer_name, CONSUMER_ACTIVE_TIMEOUT).await
}

/// [`register_consumer`], waiting at most `timeout` for the consumer to become `ACTIVE`.
pub async fn register_consumer_with_timeout(
    client: &aws_sdk_kinesis::Client,
    stream_name: &str,
    consumer_name: &str,
    timeout: Duration,
) -> Result<StreamConsumer, RegistrationError> {
    let stream_arn = stream_arn(client, stream_name).await?;
    let started = Instant::now();
    let mut poll = Duration::from_millis(100);
    let mut status = String::from("not registered");
    let mut limited: Option<(&'static str, String)> = None;
    loop {
        let described =
            client.describe_stream_consumer().stream_arn(&stream_arn).consumer_name(consumer_name).send().await;
        match described {
            Ok(output) => {
                if let Some(description) = output.consumer_description() {
                    if *description.consumer_status() == ConsumerStatus::Active {
                        return Ok(StreamConsumer::from(description));
                    }
                    // CREATING: wait. DELETING (an earlier deregistration): wait until it is gone,
                    // then register it anew.
                    status = description.consumer_status().as_str().to_owned();
                }
            }
            Err(error) if error.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
                status = String::from("not registered");
                let registered =
                    client.register_stream_consumer().stream_arn(&stream_arn).consumer_name(consumer_name).send().await;
                match registered {
                    Ok(_) => status = ConsumerStatus::Creating.as_str().to_owned(),
                    // Another worker registered it at the same moment (or it is being deleted):
                    // look again.
                    Err(error) if error.as_service_error().is_some_and(|e| e.is_resource_in_use_exception()) => {}
                    Err(error) if error.as_service_error().is_some_and(|e| e.is_limit_exceeded_exception()) => {
                        limited = Some(("RegisterStreamConsumer", DisplayErrorContext(&error).to_string()));
                    }
                    Err(error) => return Err(registration_error(stream_name, "RegisterStreamConsumer", &error)),
                }
            }
            Err(error) if error.as_service_error().is_some_and(|e| e.is_limit_exceeded_exception()) => {
                limited = Some(("DescribeStreamConsumer", DisplayErrorContext(&error).to_string()));
            }
            Err(error) => return Err(registration_error(stream_name, "DescribeStreamConsumer", &error)),
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(match limited {
                Some((action, message)) if status == "not registered" => {
                    RegistrationError::LimitExceeded { stream: stream_name.to_owned(), action, message }
                }
                _ => RegistrationError::NotActive {
                    stream: stream_name.to_owned(),
                    consumer: consumer_name.to_owned(),
                    status,
                    waited,
                },
            });
        }
        tokio::time::sleep(poll.min(timeout - waited)).await;
        poll = (poll * 2).min(Duration::from_secs(1));
    }
}

/// Deregisters `consumer_name` from the stream; `Ok` if it is not registered (or the stream is
/// gone). The consumer is `DELETING` for a while after this returns; [`register_consumer`] waits
/// for that to finish before registering the name again.
pub async fn deregister_consumer(
    client: &aws_sdk_kinesis::Client,
    stream_name: &str,
    consumer_name: &str,
) -> Result<(), RegistrationError> {
    let stream_arn = match stream_arn(client, stream_name).await {
        Ok(arn) => arn,
        Err(RegistrationError::StreamNotFound { .. }) => return Ok(()),
        Err(error) => return Err(error),
    };
    match client.deregister_stream_consumer().stream_arn(&stream_arn).consumer_name(consumer_name).send().await {
        Ok(_) => Ok(()),
        Err(error) if error.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => Ok(()),
        Err(error) => Err(registration_error(stream_name, "DeregisterStreamConsumer", &error)),
    }
}

async fn stream_arn(client: &aws_sdk_kinesis::Client, stream_name: &str) -> Result<String, RegistrationError> {
    let output = client
        .describe_stream_summary()
        .stream_name(stream_name)
        .send()
        .await
        .map_err(|error| registration_error(stream_name, "DescribeStreamSummary", &error))?;
    match output.stream_description_summary() {
        Some(summary) => Ok(summary.stream_arn().to_owned()),
        None => Err(RegistrationError::Service {
            stream: stream_name.to_owned(),
            action: "DescribeStreamSummary",
            code: "MissingSummary".into(),
            message: "the response has no stream description".into(),
            retryable: true,
        }),
    }
}

fn registration_error<E>(stream: &str, action: &'static str, error: &SdkError<E>) -> RegistrationError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let stream = stream.to_owned();
    let message = DisplayErrorContext(error).to_string();
    let Some(service_error) = error.as_service_error() else {
        return RegistrationError::Service { stream, action, code: "TransportError".into(), message, retryable: true };
    };
    match service_error.code().unwrap_or("ServiceError") {
        "ResourceNotFoundException" => RegistrationError::StreamNotFound { stream, message },
        "AccessDeniedException" => RegistrationError::AccessDenied { stream, action, message },
        "LimitExceededException" => RegistrationError::LimitExceeded { stream, action, message },
        code => RegistrationError::Service {
            stream,
            action,
            code: code.to_owned(),
            message,
            retryable: !matches!(code, "InvalidArgumentException" | "ValidationException"),
        },
    }
}

/// How a [`FanOutReader`] subscribes.
#[derive(Debug, Clone)]
pub struct FanOutConfig {
    shard_range_filter: bool,
    max_subscription: Duration,
    min_subscribe_interval: Duration,
    event_timeout: Duration,
    backoff: Duration,
    max_backoff: Duration,
    retries: u32,
}

impl Default for FanOutConfig {
    /// Subscriptions renewed only when the service ends them (5 minutes), calls a second apart
    /// (the service's limit), 30 s without an event is a dead subscription, failures backed off
    /// from 1 s doubling to 10 s, 3 retries within one read.
    fn default() -> Self {
        FanOutConfig {
            shard_range_filter: false,
            max_subscription: SUBSCRIPTION_LIFETIME,
            min_subscribe_interval: SUBSCRIBE_MIN_INTERVAL,
            event_timeout: EVENT_TIMEOUT,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            retries: 3,
        }
    }
}

impl FanOutConfig {
    /// Set aside sub-records outside the shard's hash range, as
    /// [`ReaderConfig::with_shard_range_filter`](crate::retrieval::ReaderConfig::with_shard_range_filter)
    /// does (off by default).
    pub fn with_shard_range_filter(mut self, filter: bool) -> Self {
        self.shard_range_filter = filter;
        self
    }

    /// Drop a subscription and subscribe again after this long (default 5 minutes, when the
    /// service ends it anyway). Keep it well above the 5 s between the service's events: a
    /// subscription renewed before its first event delivers nothing.
    pub fn with_max_subscription(mut self, lifetime: Duration) -> Self {
        self.max_subscription = lifetime;
        self
    }

    /// Shortest time between two `SubscribeToShard` calls (default 1 s, the service's limit).
    pub fn with_min_subscribe_interval(mut self, interval: Duration) -> Self {
        self.min_subscribe_interval = interval;
        self
    }

    /// How long without an event before the subscription is given up and made again (default 30 s).
    pub fn with_event_timeout(mut self, timeout: Duration) -> Self {
        self.event_timeout = timeout;
        self
    }

    /// Wait after a failed subscription: `first`, doubled after each further failure in a row,
    /// at most `max` (default 1 s to 10 s).
    pub fn with_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// Retryable failures one [`FanOutReader::read`] retries (after the backoff) before
    /// returning the error (default 3; 0 returns every failure at once).
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
}

/// Where the next subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resume {
    /// The reader's starting position: no event has moved it yet.
    Start(StartingPosition),
    /// After this sequence number: the continuation of the last event returned (everything up to
    /// it was delivered).
    After(String),
}

#[derive(Debug)]
struct Subscription {
    output: SubscribeToShardOutput,
    started: Instant,
    events: u64,
}

/// What waiting on the subscription gave.
enum Next {
    Event(SubscribeToShardEvent),
    /// The subscription ended (its lifetime is over) or sent something other than records:
    /// subscribe again, no harm done.
    Again,
}

/// Reads one shard through enhanced fan-out, in order: the `SubscribeToShard` counterpart of
/// [`ShardReader`], with the same [`read`](FanOutReader::read) and [`ended`](FanOutReader::ended).
#[derive(Debug)]
pub struct FanOutReader {
    client: aws_sdk_kinesis::Client,
    consumer_arn: String,
    shard_id: String,
    config: FanOutConfig,
    records: RecordConverter,
    resume: Resume,
    /// Boxed: the SDK's event stream is large, and most of the time there is one.
    subscription: Option<Box<Subscription>>,
    next_subscribe: Option<Instant>,
    /// Failures in a row, for the backoff.
    failures: u32,
    subscriptions: u64,
    ended: bool,
}

impl FanOutReader {
    pub fn new(
        client: aws_sdk_kinesis::Client,
        consumer_arn: impl Into<String>,
        shard_id: impl Into<String>,
        range: HashKeyRange,
        start: StartingPosition,
        config: FanOutConfig,
    ) -> Self {
        let records = RecordConverter::new(range, config.shard_range_filter);
        FanOutReader {
            client,
            consumer_arn: consumer_arn.into(),
            shard_id: shard_id.into(),
            config,
            records,
            resume: Resume::Start(start),
            subscription: None,
            next_subscribe: None,
            failures: 0,
            subscriptions: 0,
            ended: false,
        }
    }

    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    /// Whether the shard has been read to its end.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// How many subscriptions the reader has made so far (a metric; renewals included).
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions
    }

    /// Waits for the next event of the subscription (subscribing first if there is none) and
    /// returns its records (none when the shard is idle: the service sends an event at least
    /// every 5 s). Ended or failed subscriptions are made again from the last event returned;
    /// retryable failures are retried up to [`FanOutConfig::with_retries`] times within one read,
    /// after a backoff.
    ///
    /// Dropping the future (a timeout, a shutdown) loses nothing: the subscription is dropped
    /// with it and the next read subscribes again from the last event returned.
    pub async fn read(&mut self) -> Result<ReadResult, RetrievalError> {
        if self.ended {
            return Ok(ReadResult { shard_end: Some(Vec::new()), ..ReadResult::default() });
        }
        let mut retried = 0;
        loop {
            match self.next_event().await {
                Ok(Next::Event(event)) => {
                    self.failures = 0;
                    return Ok(self.take_event(&event));
                }
                Ok(Next::Again) => {}
                Err(error) => {
                    self.failures = self.failures.saturating_add(1);
                    let wait = backoff(self.failures, self.config.backoff, self.config.max_backoff);
                    let earliest = Instant::now() + wait;
                    self.next_subscribe = Some(self.next_subscribe.map_or(earliest, |at| at.max(earliest)));
                    tracing::debug!(shard = %self.shard_id, %error, ?wait, "subscription failed");
                    if !error.is_retryable() || retried >= self.config.retries {
                        return Err(error);
                    }
                    retried += 1;
                }
            }
        }
    }

    async fn next_event(&mut self) -> Result<Next, RetrievalError> {
        let mut subscription = match self.subscription.take() {
            Some(subscription) => subscription,
            None => self.subscribe().await?,
        };
        let renew_at = subscription.started + self.config.max_subscription;
        let now = Instant::now();
        if now >= renew_at {
            return Ok(Next::Again);
        }
        let deadline = renew_at.min(now + self.config.event_timeout);
        let received = tokio::time::timeout_at(deadline, subscription.output.event_stream.recv()).await;
        match received {
            Err(_) if Instant::now() >= renew_at => Ok(Next::Again),
            Err(_) => Err(RetrievalError::Other {
                shard: self.shard_id.clone(),
                code: "EventTimeout".into(),
                message: format!(
                    "no SubscribeToShard event for {:?} (the service sends one at least every 5 s); subscribing again",
                    self.config.event_timeout
                ),
                retryable: true,
            }),
            Ok(Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event)))) => {
                subscription.events += 1;
                self.subscription = Some(subscription);
                Ok(Next::Event(event))
            }
            // An event type newer than this SDK: not records, so nothing to deliver.
            Ok(Ok(Some(_))) => {
                self.subscription = Some(subscription);
                Ok(Next::Again)
            }
            Ok(Ok(None)) if subscription.events > 0 => Ok(Next::Again),
            // Ended before a single event: treated as a failure so that a service doing this
            // again and again gets backed off, not called in a tight loop.
            Ok(Ok(None)) => Err(RetrievalError::Other {
                shard: self.shard_id.clone(),
                code: "SubscriptionEnded".into(),
                message: "the subscription ended before its first event".into(),
                retryable: true,
            }),
            Ok(Err(error)) => Err(event_stream_error(&self.shard_id, &error)),
        }
    }

    async fn subscribe(&mut self) -> Result<Box<Subscription>, RetrievalError> {
        if let Some(at) = self.next_subscribe {
            tokio::time::sleep_until(at).await;
        }
        let position = self.subscription_start();
        self.next_subscribe = Some(Instant::now() + self.config.min_subscribe_interval);
        let output = self
            .client
            .subscribe_to_shard()
            .consumer_arn(&self.consumer_arn)
            .shard_id(&self.shard_id)
            .starting_position(position)
            .send()
            .await
            .map_err(|error| subscribe_error(&self.shard_id, &error))?;
        self.subscriptions += 1;
        tracing::debug!(shard = %self.shard_id, resume = ?self.resume, "subscribed");
        Ok(Box::new(Subscription { output, started: Instant::now(), events: 0 }))
    }

    /// Where the next subscription starts; arms the skip of what was delivered of a resumed
    /// aggregate.
    fn subscription_start(&mut self) -> SdkStartingPosition {
        let start = match &self.resume {
            Resume::Start(position) => position.iterator_start(),
            Resume::After(sequence_number) => IteratorStart {
                kind: ShardIteratorType::AfterSequenceNumber,
                sequence_number: Some(sequence_number.clone()),
                timestamp: None,
                skip_through: None,
            },
        };
        if let Some((sequence_number, sub_sequence_number)) = start.skip_through {
            self.records.skip_through(sequence_number, sub_sequence_number);
        }
        SdkStartingPosition::builder()
            .r#type(start.kind)
            .set_sequence_number(start.sequence_number)
            .set_timestamp(start.timestamp)
            .build()
            .unwrap_or_else(|_| unreachable!("the type is always set"))
    }

    fn take_event(&mut self, event: &SubscribeToShardEvent) -> ReadResult {
        let mut result =
            ReadResult { millis_behind_latest: Some(event.millis_behind_latest()), ..ReadResult::default() };
        self.records.convert(event.records(), &mut result);
        let continuation = event.continuation_sequence_number();
        // The last event of a closed shard has no continuation (the SDK reads a null one as "")
        // and names the children.
        if continuation.is_empty() {
            self.ended = true;
            self.subscription = None;
            result.shard_end = Some(event.child_shards().iter().map(|c| c.shard_id().to_owned()).collect());
            return result;
        }
        // Everything up to the continuation was delivered. Never behind the event's last record,
        // and never "0": LocalStack reports that before it has seen any record, and it is no
        // position Kinesis accepts.
        let continuation = Some(continuation).filter(|c| is_sequence_number(c));
        let last_record = event.records().last().map(|r| r.sequence_number());
        let current = match &self.resume {
            Resume::After(sequence_number) => Some(sequence_number.as_str()),
            Resume::Start(_) => None,
        };
        let furthest = [continuation, last_record, current].into_iter().flatten().max_by(|a, b| compare_sequence(a, b));
        if let Some(furthest) = furthest
            && current != Some(furthest)
        {
            self.resume = Resume::After(furthest.to_owned());
        }
        result
    }
}

/// A Kinesis sequence number: decimal digits, not zero.
fn is_sequence_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && text.bytes().any(|b| b != b'0')
}

/// Orders decimal sequence numbers (up to 128 digits, beyond `u128`) by value.
fn compare_sequence(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The wait after `failures` failures in a row: `first` doubled each time, at most `max`.
fn backoff(failures: u32, first: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    first.saturating_mul(1 << doublings).min(max)
}

fn subscribe_error(shard: &str, error: &SdkError<SubscribeToShardError>) -> RetrievalError {
    let message = DisplayErrorContext(error).to_string();
    match error.as_service_error() {
        Some(service_error) => subscribe_service_error(shard, service_error, message),
        None => {
            RetrievalError::Other { shard: shard.to_owned(), code: "TransportError".into(), message, retryable: true }
        }
    }
}

fn subscribe_service_error(shard: &str, error: &SubscribeToShardError, message: String) -> RetrievalError {
    let shard = shard.to_owned();
    match error {
        // One call per second per shard and consumer.
        SubscribeToShardError::LimitExceededException(_) | SubscribeToShardError::KmsThrottlingException(_) => {
            RetrievalError::Throttled { shard }
        }
        SubscribeToShardError::ResourceNotFoundException(_) => RetrievalError::NotFound { shard, message },
        SubscribeToShardError::AccessDeniedException(_) | SubscribeToShardError::KmsAccessDeniedException(_) => {
            RetrievalError::AccessDenied { shard, message }
        }
        // Another subscription of this consumer to the shard is open (a previous one not yet
        // closed, or another worker), or the consumer is not ACTIVE yet: both pass.
        SubscribeToShardError::ResourceInUseException(_) => RetrievalError::Other {
            shard,
            code: "ResourceInUseException".into(),
            message: format!("{message}; another subscription to the shard is open, retrying after a backoff"),
            retryable: true,
        },
        other => RetrievalError::Other {
            shard,
            code: other.code().unwrap_or("ServiceError").to_owned(),
            message,
            retryable: !matches!(
                other,
                SubscribeToShardError::InvalidArgumentException(_)
                    | SubscribeToShardError::DryRunOperationException(_)
                    | SubscribeToShardError::KmsDisabledException(_)
                    | SubscribeToShardError::KmsInvalidStateException(_)
                    | SubscribeToShardError::KmsNotFoundException(_)
                    | SubscribeToShardError::KmsOptInRequired(_)
            ),
        },
    }
}

fn event_stream_error<R>(shard: &str, error: &SdkError<SubscribeToShardEventStreamError, R>) -> RetrievalError
where
    R: std::fmt::Debug,
{
    let message = DisplayErrorContext(error).to_string();
    let shard = shard.to_owned();
    let Some(service_error) = error.as_service_error() else {
        return RetrievalError::Other { shard, code: "TransportError".into(), message, retryable: true };
    };
    match service_error {
        SubscribeToShardEventStreamError::KmsThrottlingException(_) => RetrievalError::Throttled { shard },
        SubscribeToShardEventStreamError::ResourceNotFoundException(_) => RetrievalError::NotFound { shard, message },
        SubscribeToShardEventStreamError::KmsAccessDeniedException(_) => {
            RetrievalError::AccessDenied { shard, message }
        }
        other => RetrievalError::Other {
            shard,
            code: other.code().unwrap_or("ServiceError").to_owned(),
            message,
            retryable: !matches!(
                other,
                SubscribeToShardEventStreamError::KmsDisabledException(_)
                    | SubscribeToShardEventStreamError::KmsInvalidStateException(_)
                    | SubscribeToShardEventStreamError::KmsNotFoundException(_)
                    | SubscribeToShardEventStreamError::KmsOptInRequired(_)
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_kinesis::config::retry::RetryConfig;
    use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_kinesis::primitives::Blob;
    use aws_sdk_kinesis::types::error::{
        AccessDeniedException, InvalidArgumentException, LimitExceededException, ResourceInUseException,
        ResourceNotFoundException,
    };
    use aws_sdk_kinesis::types::{ChildShard, HashKeyRange as SdkHashKeyRange, Record};
    use ktk_proto::aggregation::{Aggregator, UserRecord};

    use super::*;
    use crate::retrieval::Reader;

    /// A client that makes no call unless a test reads; then it finds nothing listening.
    fn offline_client() -> aws_sdk_kinesis::Client {
        let config = aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "unit"))
            .endpoint_url("http://127.0.0.1:1")
            .retry_config(RetryConfig::disabled())
            .build();
        aws_sdk_kinesis::Client::from_conf(config)
    }

    fn reader(start: StartingPosition) -> FanOutReader {
        FanOutReader::new(
            offline_client(),
            "arn:aws:kinesis:us-east-1:000000000000:stream/s/consumer/c:1",
            "shardId-000000000000",
            HashKeyRange::FULL,
            start,
            FanOutConfig::default(),
        )
    }

    fn plain(sequence_number: &str, data: &str) -> Record {
        Record::builder()
            .sequence_number(sequence_number)
            .partition_key("p")
            .data(Blob::new(data.as_bytes()))
            .build()
            .expect("record")
    }

    fn aggregate(sequence_number: &str, prefix: &str, n: usize) -> Record {
        let mut aggregator = Aggregator::default();
        for i in 0..n {
            aggregator
                .try_add(UserRecord::new(format!("k{i}"), format!("{prefix}-{i}")).expect("valid"))
                .expect("fits");
        }
        let record = aggregator.finish().expect("aggregate");
        Record::builder()
            .sequence_number(sequence_number)
            .partition_key(record.partition_key)
            .data(Blob::new(record.data.to_vec()))
            .build()
            .expect("record")
    }

    fn event(records: Vec<Record>, continuation: &str) -> SubscribeToShardEvent {
        SubscribeToShardEvent::builder()
            .set_records(Some(records))
            .continuation_sequence_number(continuation)
            .millis_behind_latest(7)
            .build()
            .expect("event")
    }

    fn data(result: &ReadResult) -> Vec<String> {
        result.records.iter().map(|r| String::from_utf8_lossy(&r.data).into_owned()).collect()
    }

    fn position(start: &SdkStartingPosition) -> (ShardIteratorType, Option<&str>) {
        (start.r#type().clone(), start.sequence_number())
    }

    #[test]
    fn events_are_deaggregated_and_move_the_resume_position_to_the_continuation() {
        let mut reader = reader(StartingPosition::TrimHorizon);
        assert_eq!(position(&reader.subscription_start()), (ShardIteratorType::TrimHorizon, None));
        let result = reader.take_event(&event(vec![plain("100", "a"), aggregate("200", "agg", 3)], "250"));
        assert_eq!(data(&result), ["a", "agg-0", "agg-1", "agg-2"]);
        assert_eq!(result.records.iter().map(|r| r.sub_sequence_number).collect::<Vec<_>>(), [0, 0, 1, 2]);
        assert!(result.records[1..].iter().all(|r| r.aggregated && r.sequence_number == "200"));
        assert_eq!(result.millis_behind_latest, Some(7));
        assert!(result.shard_end.is_none() && !reader.ended());
        // The next subscription starts after everything the event covered.
        assert_eq!(position(&reader.subscription_start()), (ShardIteratorType::AfterSequenceNumber, Some("250")));
        // An empty event moves the continuation on.
        assert!(reader.take_event(&event(Vec::new(), "300")).records.is_empty());
        assert_eq!(position(&reader.subscription_start()), (ShardIteratorType::AfterSequenceNumber, Some("300")));
    }

    #[test]
    fn a_checkpoint_inside_an_aggregate_resumes_exactly() {
        let after = StartingPosition::After { sequence_number: "200".into(), sub_sequence_number: 1 };
        let mut reader = reader(after);
        assert_eq!(position(&reader.subscription_start()), (ShardIteratorType::AtSequenceNumber, Some("200")));
        // An empty event before the records changes nothing: still the aggregate again.
        reader.take_event(&event(Vec::new(), "0"));
        assert_eq!(position(&reader.subscription_start()), (ShardIteratorType::AtSequenceNumber, Some("200")));
        let result = reader.take_event(&event(vec![aggregate("200", "agg", 4), plain("300", "b")], "300"));
        assert_eq!(data(&result), ["agg-2", "agg-3", "b"]);
        // Resubscribing after that is a plain AFTER_SEQUENCE_NUMBER; nothing is skipped any more.
        assert_eq!(position(&reader.subscription_start()), (ShardIteratorType::AfterSequenceNumber, Some("300")));
        let result = reader.take_event(&event(vec![plain("400", "c")], "400"));
        assert_eq!(data(&result), ["c"]);
    }

    #[test]
    fn continuations_that_are_no_position_are_not_used() {
        let mut reader = reader(StartingPosition::Latest);
        // LocalStack's continuation before any record is "0".
        reader.take_event(&event(Vec::new(), "0"));
        assert_eq!(position(&reader.subscription_start()), (ShardIteratorType::Latest, None));
        // A continuation behind the event's own last record would read it again.
        reader.take_event(&event(vec![plain("99", "a"), plain("1000", "b")], "999"));
        assert_eq!(position(&reader.subscription_start()), (ShardIteratorType::AfterSequenceNumber, Some("1000")));
        // Never backwards.
        reader.take_event(&event(Vec::new(), "500"));
        assert_eq!(position(&reader.subscription_start()), (ShardIteratorType::AfterSequenceNumber, Some("1000")));
    }

    #[tokio::test]
    async fn the_last_event_of_a_closed_shard_names_its_children() {
        let mut reader = reader(StartingPosition::TrimHorizon);
        let child = |id: &str| {
            ChildShard::builder()
                .shard_id(id)
                .parent_shards("shardId-000000000000")
                .hash_key_range(
                    SdkHashKeyRange::builder().starting_hash_key("0").ending_hash_key("1").build().expect("range"),
                )
                .build()
                .expect("child")
        };
        let last = SubscribeToShardEvent::builder()
            .records(plain("100", "a"))
            .continuation_sequence_number("")
            .millis_behind_latest(0)
            .child_shards(child("shardId-000000000001"))
            .child_shards(child("shardId-000000000002"))
            .build()
            .expect("event");
        let result = reader.take_event(&last);
        assert_eq!(data(&result), ["a"]);
        assert_eq!(result.shard_end, Some(vec!["shardId-000000000001".to_owned(), "shardId-000000000002".to_owned()]));
        assert!(reader.ended());
        // Reading on makes no call (the client could not reach anything) and says it ended.
        let after = reader.read().await.expect("no call");
        assert!(after.records.is_empty() && after.shard_end == Some(Vec::new()));
        assert_eq!(reader.subscriptions(), 0);
    }

    #[test]
    fn subscribe_errors_are_classified() {
        let shard = "shardId-000000000000";
        let in_use = SubscribeToShardError::ResourceInUseException(ResourceInUseException::builder().build());
        let error = subscribe_service_error(shard, &in_use, "in use".into());
        assert!(
            matches!(&error, RetrievalError::Other { code, retryable: true, .. } if code == "ResourceInUseException"),
            "{error:?}"
        );
        let limited = SubscribeToShardError::LimitExceededException(LimitExceededException::builder().build());
        assert!(matches!(subscribe_service_error(shard, &limited, String::new()), RetrievalError::Throttled { .. }));
        let missing = SubscribeToShardError::ResourceNotFoundException(ResourceNotFoundException::builder().build());
        let error = subscribe_service_error(shard, &missing, String::new());
        assert!(matches!(error, RetrievalError::NotFound { .. }) && !error.is_retryable());
        let denied = SubscribeToShardError::AccessDeniedException(AccessDeniedException::builder().build());
        let error = subscribe_service_error(shard, &denied, String::new());
        assert!(error.to_string().contains("kinesis:SubscribeToShard") && !error.is_retryable(), "{error}");
        let invalid = SubscribeToShardError::InvalidArgumentException(InvalidArgumentException::builder().build());
        assert!(!subscribe_service_error(shard, &invalid, String::new()).is_retryable());
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(10));
        let waits: Vec<u64> = (1..=6).map(|n| backoff(n, first, max).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff(u32::MAX, first, max), max);
    }

    #[test]
    fn sequence_numbers_compare_by_value() {
        assert_eq!(compare_sequence("999", "1000"), Ordering::Less);
        assert_eq!(compare_sequence("0042", "42"), Ordering::Equal);
        let big = "49680446584620635720757287451349697017759526233405652994";
        assert_eq!(
            compare_sequence(big, "49680446584620635720757287451347279166120296975056240642"),
            Ordering::Greater
        );
        assert!(
            is_sequence_number(big) && !is_sequence_number("0") && !is_sequence_number("") && !is_sequence_number("x1")
        );
    }

    #[tokio::test]
    async fn failed_subscriptions_are_retried_after_a_backoff_then_reported() {
        // Nothing listens on port 1: every call fails at once, so the waits are the backoff's
        // (the backoff wins over the shorter interval between calls).
        let config = FanOutConfig::default()
            .with_min_subscribe_interval(Duration::from_millis(10))
            .with_backoff(Duration::from_millis(50), Duration::from_millis(200))
            .with_retries(2);
        let mut reader = FanOutReader::new(
            offline_client(),
            "arn:aws:kinesis:us-east-1:000000000000:stream/s/consumer/c:1",
            "shardId-000000000000",
            HashKeyRange::FULL,
            StartingPosition::TrimHorizon,
            config,
        );
        let started = Instant::now();
        let error = reader.read().await.expect_err("nothing listens there");
        assert!(matches!(&error, RetrievalError::Other { code, .. } if code == "TransportError"), "{error:?}");
        assert!(error.is_retryable());
        // Three attempts, backed off 50 ms and 100 ms.
        assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
        assert_eq!(reader.subscriptions(), 0);
        // The next read keeps backing off (failures in a row add up): 200 ms before each attempt.
        let started = Instant::now();
        reader.read().await.expect_err("still nothing");
        assert!(started.elapsed() >= Duration::from_millis(600), "{:?}", started.elapsed());
    }

    #[test]
    fn the_reader_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let mut polling = Reader::FanOut(reader(StartingPosition::TrimHorizon));
        assert_send(&polling.read());
        assert_eq!(polling.shard_id(), "shardId-000000000000");
        assert!(!polling.ended());
    }
}
