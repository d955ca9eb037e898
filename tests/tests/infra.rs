//! The CloudFormation templates in `infra/`: they pass cfn-lint; the data plane deploys to
//! LocalStack's CloudFormation and the producer and a consumer worker (delivering to S3) then run
//! on exactly what it created; compute.yaml validates, and its parts that LocalStack can create
//! (the IAM policies and the stream alarms, over the data plane's exports) deploy.
//!
//! LocalStack 2026.3.0's CloudFormation accepts every data-plane property but applies only some:
//! it creates the stream (mode, shard count), the table (key schema, on-demand billing) and the
//! bucket (versioning, policy), and silently drops the stream's KMS encryption, the table's
//! point-in-time recovery and deletion protection, and the bucket's lifecycle rules (its
//! encryption, public access block and ownership settings match S3's defaults anyway). The test
//! checks what LocalStack applies; cfn-lint checks the rest of the templates against AWS's schemas.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_cloudformation::error::DisplayErrorContext;
use aws_sdk_cloudformation::types::{Capability, Parameter, StackStatus};
use aws_sdk_dynamodb::types::{BillingMode, KeyType, ScalarAttributeType};
use aws_sdk_kinesis::types::{StreamMode, StreamStatus};
use ktk_consumer::Worker;
use ktk_ecs::DeliveryProcessor;
use ktk_pipeline::s3::{self, S3Sink, S3SinkConfig, read_events};
use ktk_pipeline::{Pipeline, PipelineConfig, Sink};
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_proto::events::v1::{Event, EventType, Platform};
use ktk_tests::worker_support::fast_worker_config;
use ktk_tests::{DEFAULT_ENDPOINT, aws_config, dynamodb, kinesis, unique_name};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// How long a stack may take to be created or deleted (LocalStack: about a second).
const STACK_TIMEOUT: Duration = Duration::from_secs(120);

fn infra_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("infra")
}

fn template(name: &str) -> String {
    let path = infra_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A CloudFormation client, after checking that the service answers; panics with what to do if not.
async fn cloudformation() -> aws_sdk_cloudformation::Client {
    let config = aws_config().await;
    let client = aws_sdk_cloudformation::Client::new(&config);
    if let Err(error) = client.list_stacks().send().await {
        panic!(
            "CloudFormation is not reachable at {}: {}. Start LocalStack with `localstack/up.sh` (its \
             SERVICES include cloudformation; or set AWS_ENDPOINT_URL); these tests never skip.",
            config.endpoint_url().unwrap_or(DEFAULT_ENDPOINT),
            DisplayErrorContext(&error)
        );
    }
    client
}

/// The stack's events, oldest first, one per line (for failure messages).
async fn stack_events(client: &aws_sdk_cloudformation::Client, stack: &str) -> String {
    match client.describe_stack_events().stack_name(stack).send().await {
        Ok(output) => output
            .stack_events()
            .iter()
            .rev()
            .map(|e| {
                format!(
                    "  {} {} {} {}",
                    e.logical_resource_id().unwrap_or("?"),
                    e.resource_type().unwrap_or("?"),
                    e.resource_status().map(|s| s.as_str()).unwrap_or("?"),
                    e.resource_status_reason().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("  (no events: {})", DisplayErrorContext(&e)),
    }
}

/// The stack's status, or `None` once it is gone.
async fn stack_status(client: &aws_sdk_cloudformation::Client, stack: &str) -> Option<(StackStatus, String)> {
    match client.describe_stacks().stack_name(stack).send().await {
        Ok(output) => output.stacks().first().and_then(|s| {
            s.stack_status().map(|status| (status.clone(), s.stack_status_reason().unwrap_or("").to_owned()))
        }),
        Err(e) if DisplayErrorContext(&e).to_string().contains("does not exist") => None,
        Err(e) => panic!("describe stack {stack}: {}", DisplayErrorContext(&e)),
    }
}

/// Creates a stack from `template` and waits for CREATE_COMPLETE; returns its outputs. On any other
/// end (or the timeout) prints the stack's events, deletes it and panics.
async fn create_stack(
    client: &aws_sdk_cloudformation::Client,
    stack: &str,
    template: &str,
    parameters: &[(&str, &str)],
) -> HashMap<String, String> {
    let started = Instant::now();
    let mut request =
        client.create_stack().stack_name(stack).template_body(template).capabilities(Capability::CapabilityIam);
    for (key, value) in parameters {
        request = request.parameters(Parameter::builder().parameter_key(*key).parameter_value(*value).build());
    }
    request.send().await.unwrap_or_else(|e| panic!("create stack {stack}: {}", DisplayErrorContext(&e)));
    let failure = loop {
        match stack_status(client, stack).await {
            Some((StackStatus::CreateComplete, _)) => break None,
            Some((StackStatus::CreateInProgress, _)) if started.elapsed() < STACK_TIMEOUT => {}
            Some((StackStatus::CreateInProgress, _)) => {
                break Some(format!("still CREATE_IN_PROGRESS after {STACK_TIMEOUT:?}"));
            }
            Some((status, reason)) => break Some(format!("{} {reason}", status.as_str())),
            None => break Some("gone".to_owned()),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(failure) = failure {
        let events = stack_events(client, stack).await;
        let _ = client.delete_stack().stack_name(stack).send().await;
        panic!("stack {stack} was not created: {failure}\nevents:\n{events}");
    }
    let described = client.describe_stacks().stack_name(stack).send().await.expect("describe the created stack");
    let outputs = described.stacks().first().map(|s| s.outputs()).unwrap_or_default();
    outputs
        .iter()
        .filter_map(|o| Some((o.output_key()?.to_owned(), o.output_value().unwrap_or_default().to_owned())))
        .collect()
}

/// Deletes a stack and waits until it is gone (LocalStack forgets a deleted stack at once; AWS
/// shows DELETE_COMPLETE).
async fn delete_stack(client: &aws_sdk_cloudformation::Client, stack: &str) {
    let started = Instant::now();
    client
        .delete_stack()
        .stack_name(stack)
        .send()
        .await
        .unwrap_or_else(|e| panic!("delete stack {stack}: {}", DisplayErrorContext(&e)));
    loop {
        match stack_status(client, stack).await {
            None | Some((StackStatus::DeleteComplete, _)) => return,
            Some((StackStatus::DeleteFailed, reason)) => {
                panic!("stack {stack}: DELETE_FAILED {reason}\nevents:\n{}", stack_events(client, stack).await)
            }
            Some((status, _)) => {
                assert!(
                    started.elapsed() < STACK_TIMEOUT,
                    "stack {stack} still {} after {STACK_TIMEOUT:?}",
                    status.as_str()
                )
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Removes every object version and delete marker, as CloudFormation only deletes empty buckets.
async fn empty_bucket(client: &s3::Client, bucket: &str) {
    let (mut key_marker, mut version_marker): (Option<String>, Option<String>) = (None, None);
    loop {
        let page = client
            .list_object_versions()
            .bucket(bucket)
            .set_key_marker(key_marker.take())
            .set_version_id_marker(version_marker.take())
            .send()
            .await
            .unwrap_or_else(|e| panic!("list versions in {bucket}: {e:?}"));
        let versions = page.versions().iter().map(|v| (v.key(), v.version_id()));
        let markers = page.delete_markers().iter().map(|m| (m.key(), m.version_id()));
        for (key, version) in versions.chain(markers) {
            let key = key.expect("a listed version has a key");
            client
                .delete_object()
                .bucket(bucket)
                .key(key)
                .set_version_id(version.map(str::to_owned))
                .send()
                .await
                .unwrap_or_else(|e| panic!("delete {key} from {bucket}: {e:?}"));
        }
        if page.is_truncated() != Some(true) {
            return;
        }
        key_marker = page.next_key_marker().map(str::to_owned);
        version_marker = page.next_version_id_marker().map(str::to_owned);
    }
}

fn event(i: usize) -> Event {
    let platforms = [Platform::Ios, Platform::Android, Platform::Roku, Platform::Web];
    Event {
        event_id: format!("infra-{i:05}"),
        r#type: if i.is_multiple_of(4) { EventType::Play } else { EventType::Heartbeat } as i32,
        occurred_at_ms: 1_760_000_000_000 + (i as i64) * 250,
        user_id: format!("user-{}", i % 97),
        session_id: format!("session-{}", i / 25),
        platform: platforms[i % platforms.len()] as i32,
        content_id: format!("content-{}", i % 13),
        ..Event::default()
    }
}

#[test]
fn cfn_lint_passes() {
    let script = infra_dir().join("lint.sh");
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e} (bash is needed)", script.display()));
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "infra/lint.sh failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    print!("{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_deploys_and_carries_events_from_the_producer_through_a_worker_to_s3() {
    const EVENTS: usize = 2_000;
    const SHARDS: i32 = 2;
    let cloudformation = cloudformation().await;
    let kinesis = kinesis().await;
    let dynamodb = dynamodb().await;
    let aws = aws_config().await;
    let s3 = s3::client(&aws, true);

    let name = unique_name("ktk-infra").to_lowercase();
    let (stream, application, bucket) = (format!("{name}-events"), format!("{name}-app"), format!("{name}-data"));
    let started = Instant::now();
    let outputs = create_stack(
        &cloudformation,
        &name,
        &template("data-plane.yaml"),
        &[
            ("StreamName", &stream),
            ("ShardCount", &SHARDS.to_string()),
            ("ApplicationName", &application),
            ("BucketName", &bucket),
            // So that the stack can be deleted at the end (on AWS too).
            ("EnableTableDeletionProtection", "false"),
        ],
    )
    .await;
    let deployed_in = started.elapsed();

    // The outputs name what was created.
    let output = |key: &str| outputs.get(key).cloned().unwrap_or_else(|| panic!("output {key} missing: {outputs:?}"));
    assert_eq!(output("StreamName"), stream);
    assert!(output("StreamArn").ends_with(&format!(":stream/{stream}")), "{outputs:?}");
    assert_eq!(output("ApplicationName"), application);
    assert!(output("LeaseTableArn").ends_with(&format!(":table/{application}")), "{outputs:?}");
    assert_eq!(output("BucketName"), bucket);
    assert_eq!(output("DataPrefix"), "events");
    assert_eq!(output("DeadLetterLocation"), format!("s3://{bucket}/events/dead-letters/"));
    assert_eq!(output("StreamKmsKeyId"), "alias/aws/kinesis");

    // The stream: active, provisioned, with the shards asked for.
    let summary = kinesis.describe_stream_summary().stream_name(&stream).send().await.expect("stream exists");
    let summary = summary.stream_description_summary().expect("summary");
    assert_eq!(summary.stream_status(), &StreamStatus::Active);
    assert_eq!(summary.stream_mode_details().map(|m| m.stream_mode()), Some(&StreamMode::Provisioned));
    assert_eq!(summary.open_shard_count(), SHARDS);
    assert_eq!(summary.retention_period_hours(), 24);
    println!(
        "stream encryption as LocalStack reports it: {:?} (LocalStack's CloudFormation drops StreamEncryption; \
         AWS applies KMS with alias/aws/kinesis)",
        summary.encryption_type()
    );

    // The lease table: the KCL's key, on-demand.
    let table = dynamodb.describe_table().table_name(&application).send().await.expect("lease table exists");
    let table = table.table().expect("table description");
    let keys = table.key_schema();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!((keys[0].attribute_name(), keys[0].key_type()), ("leaseKey", &KeyType::Hash));
    assert!(
        table
            .attribute_definitions()
            .iter()
            .any(|d| d.attribute_name() == "leaseKey" && d.attribute_type() == &ScalarAttributeType::S),
        "{:?}",
        table.attribute_definitions()
    );
    assert_eq!(table.billing_mode_summary().and_then(|b| b.billing_mode()), Some(&BillingMode::PayPerRequest));

    // The bucket: versioned, TLS-only policy, encrypted, not public.
    let versioning = s3.get_bucket_versioning().bucket(&bucket).send().await.expect("bucket versioning");
    assert_eq!(versioning.status().map(|s| s.as_str()), Some("Enabled"));
    let policy = s3.get_bucket_policy().bucket(&bucket).send().await.expect("bucket policy");
    let policy = policy.policy().unwrap_or_default();
    assert!(policy.contains("DenyInsecureTransport") && policy.contains("aws:SecureTransport"), "{policy}");
    let encryption = s3.get_bucket_encryption().bucket(&bucket).send().await.expect("bucket encryption");
    let rules = encryption.server_side_encryption_configuration().map(|c| c.rules()).unwrap_or_default();
    assert!(
        rules
            .iter()
            .any(|r| r.apply_server_side_encryption_by_default().map(|d| d.sse_algorithm().as_str()) == Some("AES256")),
        "{rules:?}"
    );
    let public = s3.get_public_access_block().bucket(&bucket).send().await.expect("public access block");
    let public = public.public_access_block_configuration().expect("configuration");
    assert_eq!(
        (
            public.block_public_acls(),
            public.ignore_public_acls(),
            public.block_public_policy(),
            public.restrict_public_buckets()
        ),
        (Some(true), Some(true), Some(true), Some(true))
    );

    // The producer writes into the stack's stream.
    let producing = Instant::now();
    let producer = Producer::new(ProducerConfig::new(&stream).with_request_timeout(Duration::from_secs(60)), &aws)
        .await
        .expect("producer starts on the stack's stream");
    let mut receipts = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let e = event(i);
        receipts.push(producer.put(Record::new(e.user_id.clone(), e.encode_to_vec())).await.expect("put"));
    }
    for receipt in receipts {
        receipt.await.expect("acknowledged");
    }
    producer.shutdown(Duration::from_secs(10)).await;
    let produced_in = producing.elapsed();

    // A worker of the application named by the stack (its lease table) delivers to the stack's bucket.
    let delivering = Instant::now();
    let sink = S3Sink::with_client(s3.clone(), S3SinkConfig::new(&bucket, output("DataPrefix")));
    let pipeline = Pipeline::new(
        PipelineConfig::default()
            .with_batch_window(Duration::from_secs(2), Duration::from_millis(500))
            .with_max_batch_records(500),
        vec![Arc::new(sink) as Arc<dyn Sink>],
    )
    .expect("valid pipeline");
    let factory = {
        let (pipeline, stream_name) = (pipeline.clone(), stream.to_string());
        move |shard: &str| DeliveryProcessor::new(&pipeline, &stream_name, shard)
    };
    let config = fast_worker_config(&stream, &output("ApplicationName"), "infra-worker").with_empty_batches(true);
    let worker = Worker::new(config, &aws, factory).expect("worker config");
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    loop {
        let stats = pipeline.stats();
        if stats.events_delivered >= EVENTS as u64 {
            break;
        }
        assert!(!handle.is_finished(), "the worker stopped early: {stats:?}");
        assert!(delivering.elapsed() < Duration::from_secs(90), "delivery stalled: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let report = handle.await.expect("worker task").expect("worker");
    let stats = pipeline.stats();
    let delivered_in = delivering.elapsed();
    assert_eq!(stats.events_delivered, EVENTS as u64, "{stats:?}");
    assert_eq!(stats.dead_letters, 0, "{stats:?}");

    // The worker kept its leases in the stack's table (one per shard), not in a table of its own.
    let leases = dynamodb.scan().table_name(&application).consistent_read(true).send().await.expect("scan leases");
    let lease_keys: HashSet<&str> =
        leases.items().iter().filter_map(|item| item.get("leaseKey")?.as_s().ok().map(String::as_str)).collect();
    assert_eq!(lease_keys.len(), SHARDS as usize, "one lease per shard in {application}: {lease_keys:?}");

    // S3 holds every event exactly once.
    let read = read_events(&s3, &bucket, &output("DataPrefix")).await.expect("read the stack's bucket");
    let ids: HashSet<String> = read.events.iter().map(|e| e.event.event_id.clone()).collect();
    let expected: HashSet<String> = (0..EVENTS).map(|i| event(i).event_id).collect();
    assert_eq!(read.duplicates, 0, "no event written twice");
    assert_eq!(read.events.len(), EVENTS);
    assert_eq!(ids, expected, "every event that was put, and nothing else");

    // Deleting the stack (once the bucket is empty) removes what it created.
    let deleting = Instant::now();
    empty_bucket(&s3, &bucket).await;
    delete_stack(&cloudformation, &name).await;
    let deleted_in = deleting.elapsed();
    assert!(s3.head_bucket().bucket(&bucket).send().await.is_err(), "bucket {bucket} still exists");
    assert!(
        dynamodb.describe_table().table_name(&application).send().await.is_err(),
        "table {application} still exists"
    );
    match kinesis.describe_stream_summary().stream_name(&stream).send().await {
        Err(_) => {}
        Ok(s) => assert_ne!(
            s.stream_description_summary().map(|s| s.stream_status()),
            Some(&StreamStatus::Active),
            "stream {stream} still active"
        ),
    }
    println!(
        "infra: stack created in {deployed_in:?}; {EVENTS} events produced in {produced_in:?}, delivered to S3 in \
         {delivered_in:?} ({} objects, {} bytes; worker took {} leases); stack deleted in {deleted_in:?}; \
         total {:?}",
        read.objects,
        read.bytes,
        report.leases_taken,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_template_validates_and_its_policies_and_stream_alarms_deploy_over_the_data_plane() {
    let cloudformation = cloudformation().await;
    let compute = template("compute.yaml");

    let validated = cloudformation
        .validate_template()
        .template_body(&compute)
        .send()
        .await
        .unwrap_or_else(|e| panic!("compute.yaml does not validate: {}", DisplayErrorContext(&e)));
    let parameters: HashSet<&str> = validated.parameters().iter().filter_map(|p| p.parameter_key()).collect();
    for expected in [
        "DataPlaneStack",
        "ConsumerImage",
        "PostgresUrlSecretArn",
        "LambdaCodeBucket",
        "LambdaCodeKey",
        "BatchSize",
        "MaximumBatchingWindowInSeconds",
        "MaximumRetryAttempts",
        "MaximumRecordAgeInSeconds",
        "MetricsNamespace",
        "EnableDashboard",
    ] {
        assert!(parameters.contains(expected), "compute.yaml lacks parameter {expected}: {parameters:?}");
    }

    // LocalStack (without Docker, ECS or Lambda) can create neither the ECS service nor the
    // function, and its community edition has no CloudWatch dashboards; with both consumers and
    // the dashboard off, the rest deploys and resolves the data plane's exports.
    let name = unique_name("ktk-infra-dp").to_lowercase();
    create_stack(
        &cloudformation,
        &name,
        &template("data-plane.yaml"),
        &[
            ("StreamName", &format!("{name}-events")),
            ("ShardCount", "1"),
            ("ApplicationName", &format!("{name}-app")),
            ("BucketName", &format!("{name}-data")),
            ("EnableTableDeletionProtection", "false"),
        ],
    )
    .await;
    let compute_stack = format!("{name}-compute");
    let outputs = create_stack(
        &cloudformation,
        &compute_stack,
        &compute,
        &[
            ("DataPlaneStack", &name),
            ("EnableEcsConsumer", "false"),
            ("EnableLambdaConsumer", "false"),
            ("EnableDashboard", "false"),
        ],
    )
    .await;
    assert!(outputs.get("ProducerPolicyArn").is_some_and(|arn| arn.contains(":policy/")), "{outputs:?}");
    let resources = cloudformation
        .describe_stack_resources()
        .stack_name(&compute_stack)
        .send()
        .await
        .expect("describe the compute stack's resources");
    let created: HashMap<&str, &str> = resources
        .stack_resources()
        .iter()
        .filter_map(|r| Some((r.logical_resource_id()?, r.resource_type()?)))
        .collect();
    let wanted = HashMap::from([
        ("DeliveryPolicy", "AWS::IAM::ManagedPolicy"),
        ("ProducerPolicy", "AWS::IAM::ManagedPolicy"),
        ("PutRecordsFailedAlarm", "AWS::CloudWatch::Alarm"),
        ("WriteThrottledAlarm", "AWS::CloudWatch::Alarm"),
        ("StreamIteratorAgeAlarm", "AWS::CloudWatch::Alarm"),
    ]);
    assert_eq!(
        created, wanted,
        "with both consumers and the dashboard off, the shared policies and the stream alarms only"
    );

    // The compute stack imports the data plane's exports: it goes first.
    delete_stack(&cloudformation, &compute_stack).await;
    delete_stack(&cloudformation, &name).await;
}
