//! `bootstrap`: the delivery pipeline as a Lambda function (`provided.al2023`) behind a Kinesis
//! event source mapping. Settings come from `KTK_*` environment variables (or flags; see
//! `bootstrap --help` and `ktk_lambda::config`), AWS settings from the standard chain.
//!
//! Init builds everything once per container: the settings, the AWS configuration, the S3 client
//! and the stores' pools (connected and migrated). A bad setting or an unreachable store is
//! reported to the Runtime API's `/init/error`, naming the variable, and the process exits (2 for a
//! bad setting or an unknown `KTK_*` variable, 1 for an unreachable store).
//! Each invocation logs its report and one CloudWatch embedded-metric-format line
//! (`ktk_lambda::emf`: `SinkFailing`, `UserRecords`, `Failures`, ... in `KTK_METRICS_NAMESPACE`).
//! On SIGTERM (Lambda's shutdown of an idle container) the stores' pools are closed and the logs
//! flushed before the process exits.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use aws_lambda_events::event::streams::KinesisEventResponse;
use clap::{CommandFactory, Parser};
use ktk_lambda::{KinesisHandler, LambdaSettings, emf, parse_event};
use lambda_runtime::{LambdaEvent, service_fn};
use lambda_runtime_api_client::body::Body;
use tracing::{error, info};

#[tokio::main]
async fn main() -> ExitCode {
    // Logs that cannot be written are lost, never a panic (see `ktk_settings::stdio`).
    lambda_runtime::tracing::init_default_subscriber_with_writer(ktk_settings::stdio::lossy_stdout);
    let parsed = LambdaSettings::try_parse();
    // --help and --version print and exit 0.
    if let Err(e) = &parsed
        && !e.use_stderr()
    {
        e.exit();
    }
    // An unknown `KTK_*` variable (a misspelt setting) fails the init like a bad value.
    if let Err(line) = ktk_pipeline::settings::check_environment(&LambdaSettings::command()) {
        ktk_settings::stdio::eprint_line(&line);
        return init_failed("InvalidSetting", &line, 2).await;
    }
    let settings = match parsed {
        Ok(settings) => settings,
        Err(e) => {
            let line = ktk_pipeline::settings::one_line(&LambdaSettings::command(), &e);
            ktk_settings::stdio::eprint_line(&line);
            return init_failed("InvalidSetting", &line, 2).await;
        }
    };
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let sinks = match settings.sinks.connect(&aws, settings.store_config()).await {
        Ok(sinks) => sinks,
        Err(e) => return init_failed("SinkUnavailable", &e.to_string(), 1).await,
    };
    let handler = match KinesisHandler::new(settings.handler_config(), sinks.all()) {
        Ok(handler) => Arc::new(handler),
        Err(e) => return init_failed("InvalidSetting", &e.to_string(), 2).await,
    };
    let names: Vec<&str> = handler.sink_names().collect();
    info!(sinks = ?names, "ready");

    let closing = sinks.clone();
    lambda_runtime::spawn_graceful_shutdown_handler(move || async move {
        info!("shutting down: closing the stores' pools");
        closing.close().await;
        info!("shut down");
        let _ = std::io::stdout().flush();
    })
    .await;

    let namespace: Arc<str> = Arc::from(settings.metrics_namespace.as_str());
    let function = service_fn(move |invocation: LambdaEvent<serde_json::Value>| {
        let (handler, namespace) = (Arc::clone(&handler), Arc::clone(&namespace));
        async move {
            let request_id = invocation.context.request_id.clone();
            // Not a Kinesis event at all: a function error (the mapping retries, then bisects).
            let event = parse_event(invocation.payload)
                .map_err(|e| format!("the event is not a Kinesis event source mapping batch: {e}"))?;
            let report = handler.handle_until(event, invocation.context.deadline()).await;
            KinesisHandler::log(&report, &request_id);
            // The invocation's metrics and health verdict, for CloudWatch (and its alarm).
            emf::emit(&report, &namespace, &invocation.context.env_config.function_name, &request_id);
            Ok::<KinesisEventResponse, lambda_runtime::Error>(report.response())
        }
    });
    match lambda_runtime::run(function).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("the runtime stopped: {e}");
            sinks.close().await;
            ExitCode::FAILURE
        }
    }
}

/// Logs the init error, reports it to the Runtime API (so the invocation that waits on the init
/// fails with this message, not a bare exit status) and exits with `status` (2 for a bad setting,
/// 1 for a sink that cannot be reached).
async fn init_failed(error_type: &str, message: &str, status: u8) -> ExitCode {
    error!(error_type, "init failed: {message}");
    if let Err(e) = report_init_error(error_type, message).await {
        error!("could not report the init error to the Runtime API: {e}");
    }
    let _ = std::io::stdout().flush();
    ExitCode::from(status)
}

/// `POST /2018-06-01/runtime/init/error` (the Runtime API's address is `AWS_LAMBDA_RUNTIME_API`).
async fn report_init_error(error_type: &str, message: &str) -> Result<(), lambda_runtime::Error> {
    let client = lambda_runtime_api_client::PooledClient::builder().build();
    let body = serde_json::to_vec(&serde_json::json!({ "errorType": error_type, "errorMessage": message }))?;
    let request = lambda_runtime_api_client::build_request()
        .method("POST")
        .uri("/2018-06-01/runtime/init/error")
        .header("Lambda-Runtime-Function-Error-Type", "Runtime.InitError")
        .header("Content-Type", "application/json")
        .body(Body::from(body))?;
    let response = client.call(request).await?;
    if !response.status().is_success() {
        return Err(format!("the Runtime API answered {}", response.status()).into());
    }
    Ok(())
}
