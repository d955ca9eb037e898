//! The lease table's items in DynamoDB: [`DynamoDbItems`] carries out the item operations of
//! [`ItemStore`] with the SDK client (conditions as condition expressions, every name and value
//! a placeholder), creates the table when it is missing, and decides once, from the SDK's typed
//! errors, what each failure means (a failed condition, a missing table, throttling, access
//! denied, transient or not).
//!
//! The client keeps the SDK's standard retries (throttling, timeouts, 5xx); a failed condition
//! is a 400 the SDK never retries.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::operation::get_item::GetItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::scan::ScanError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableDescription, TableStatus,
};
use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::item_store::{Condition, Failure, ItemStore, ScanPage, Update};
use crate::lease::serializer::{self, Item, attr};
use crate::lease::table::TableSetup;

/// The items of the lease table `name`, through the SDK client.
#[derive(Debug, Clone)]
pub(crate) struct DynamoDbItems {
    client: Client,
    name: String,
}

impl DynamoDbItems {
    pub(crate) fn new(client: Client, name: String) -> Self {
        DynamoDbItems { client, name }
    }

    async fn ensure(&self, wait: Duration) -> Result<TableSetup> {
        let started = Instant::now();
        let setup = match self.describe().await? {
            Some(table) => {
                self.check_key_schema(&table)?;
                if usable(&table) {
                    return Ok(TableSetup::Existed);
                }
                // Being created by another worker: wait for it below.
                TableSetup::Existed
            }
            None => self.create_table().await?,
        };
        self.wait_until_active(started, wait).await?;
        Ok(setup)
    }

    async fn describe(&self) -> Result<Option<TableDescription>> {
        match self.client.describe_table().table_name(&self.name).send().await {
            Ok(output) => Ok(output.table),
            Err(e) => match self.fail("DescribeTable", e, describe_kind) {
                Failed::Error(Error::TableNotFound { .. }) => Ok(None),
                other => Err(other.into_error()),
            },
        }
    }

    async fn create_table(&self) -> Result<TableSetup> {
        let key = KeySchemaElement::builder().attribute_name(attr::LEASE_KEY).key_type(KeyType::Hash).build();
        let definition = AttributeDefinition::builder()
            .attribute_name(attr::LEASE_KEY)
            .attribute_type(ScalarAttributeType::S)
            .build();
        let (key, definition) = match (key, definition) {
            (Ok(key), Ok(definition)) => (key, definition),
            (Err(e), _) | (_, Err(e)) => {
                return Err(Error::Service {
                    table: self.name.clone(),
                    action: "CreateTable",
                    code: "InvalidRequest".into(),
                    message: e.to_string(),
                    retryable: false,
                });
            }
        };
        let result = self
            .client
            .create_table()
            .table_name(&self.name)
            .key_schema(key)
            .attribute_definitions(definition)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(table = %self.name, "created lease table (on-demand billing, key leaseKey)");
                Ok(TableSetup::Created)
            }
            Err(e) => match self.fail("CreateTable", e, create_kind) {
                // Another worker is creating it right now.
                Failed::InUse => Ok(TableSetup::Existed),
                other => Err(other.into_error()),
            },
        }
    }

    async fn wait_until_active(&self, started: Instant, wait: Duration) -> Result<()> {
        let mut pause = Duration::from_millis(100);
        loop {
            let status = match self.describe().await? {
                Some(table) => {
                    self.check_key_schema(&table)?;
                    if usable(&table) {
                        return Ok(());
                    }
                    let status = table.table_status.clone();
                    if status != Some(TableStatus::Creating) {
                        // Deleting, archived, unreadable keys...: waiting will not help.
                        return Err(self.not_active(status, started));
                    }
                    status
                }
                // Just created, not yet visible: keep waiting.
                None => None,
            };
            if started.elapsed() >= wait {
                return Err(self.not_active(status, started));
            }
            tokio::time::sleep(pause.min(wait.saturating_sub(started.elapsed()))).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    fn not_active(&self, status: Option<TableStatus>, started: Instant) -> Error {
        Error::TableNotActive {
            table: self.name.clone(),
            status: status.map_or_else(|| "not yet visible".to_owned(), |s| s.as_str().to_owned()),
            waited: started.elapsed(),
        }
    }

    fn check_key_schema(&self, table: &TableDescription) -> Result<()> {
        let keys = table.key_schema();
        let lease_key_is_string = table
            .attribute_definitions()
            .iter()
            .any(|d| d.attribute_name() == attr::LEASE_KEY && d.attribute_type() == &ScalarAttributeType::S);
        let right = keys.len() == 1
            && keys[0].attribute_name() == attr::LEASE_KEY
            && keys[0].key_type() == &KeyType::Hash
            && lease_key_is_string;
        if right {
            return Ok(());
        }
        let type_of = |name: &str| {
            table
                .attribute_definitions()
                .iter()
                .find(|d| d.attribute_name() == name)
                .map_or("?", |d| d.attribute_type().as_str())
        };
        let found = keys
            .iter()
            .map(|k| format!("{} ({}, {})", k.attribute_name(), type_of(k.attribute_name()), k.key_type().as_str()))
            .collect::<Vec<_>>()
            .join(" + ");
        Err(Error::TableKeySchema { table: self.name.clone(), found })
    }

    /// What a failed call means, decided once from the SDK's typed error (`kind_of`), with the
    /// error codes DynamoDB does not model (access denied, validation...) read from the code.
    fn fail<E>(&self, action: &'static str, error: SdkError<E, HttpResponse>, kind_of: fn(&E) -> Kind) -> Failed
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (kind, code) = match &error {
            SdkError::ServiceError(service) => {
                let kind = match kind_of(service.err()) {
                    Kind::Unmodeled => kind_for_code(service.err().code(), service.raw().status().is_server_error()),
                    kind => kind,
                };
                (kind, service.err().code().unwrap_or("ServiceError").to_owned())
            }
            SdkError::TimeoutError(_) => (Kind::Transient, "RequestTimeout".to_owned()),
            SdkError::DispatchFailure(_) => (Kind::Transient, "ConnectionError".to_owned()),
            SdkError::ResponseError(_) => (Kind::Transient, "ResponseError".to_owned()),
            // A request that could not even be built: a bug, not a condition of the service.
            _ => (Kind::Rejected, "ConstructionFailure".to_owned()),
        };
        let table = self.name.clone();
        let message = || match &error {
            SdkError::ServiceError(service) => service.err().message().unwrap_or("no message").to_owned(),
            _ => DisplayErrorContext(&error).to_string(),
        };
        match kind {
            Kind::Condition(item) => Failed::Condition(item),
            Kind::InUse => Failed::InUse,
            Kind::NotFound => Failed::Error(Error::TableNotFound { table }),
            Kind::AccessDenied => Failed::Error(Error::AccessDenied { table, action, message: message() }),
            Kind::Throttled => Failed::Error(Error::Throttled { table, action, message: message() }),
            Kind::Transient | Kind::Unmodeled => {
                Failed::Error(Error::Service { table, action, code, message: message(), retryable: true })
            }
            Kind::Rejected => {
                Failed::Error(Error::Service { table, action, code, message: message(), retryable: false })
            }
        }
    }
}

impl ItemStore for DynamoDbItems {
    fn ensure_table(&self, wait: Duration) -> BoxFuture<'_, Result<TableSetup>> {
        Box::pin(self.ensure(wait))
    }

    fn scan(&self, start: Option<Item>) -> BoxFuture<'_, Result<ScanPage>> {
        Box::pin(async move {
            let page = self
                .client
                .scan()
                .table_name(&self.name)
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| self.fail("Scan", e, scan_kind).into_error())?;
            Ok(ScanPage {
                items: page.items.unwrap_or_default(),
                last_key: page.last_evaluated_key.filter(|key| !key.is_empty()),
            })
        })
    }

    fn get_item<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Item>>> {
        Box::pin(async move {
            let output = self
                .client
                .get_item()
                .table_name(&self.name)
                .set_key(Some(serializer::key(key)))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| self.fail("GetItem", e, get_kind).into_error())?;
            Ok(output.item.filter(|item| !item.is_empty()))
        })
    }

    fn put_if_absent(&self, item: Item) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let result = self
                .client
                .put_item()
                .table_name(&self.name)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(#leaseKey)")
                .expression_attribute_names("#leaseKey", attr::LEASE_KEY)
                .send()
                .await;
            match result {
                Ok(_) => Ok(true),
                Err(e) => match self.fail("PutItem", e, put_kind) {
                    Failed::Condition(_) => Ok(false),
                    other => Err(other.into_error()),
                },
            }
        })
    }

    fn update_item<'a>(&'a self, key: &'a str, update: Update) -> BoxFuture<'a, std::result::Result<Item, Failure>> {
        Box::pin(async move {
            let (expression, condition, names, values) = Expressions::update(&update);
            let result = self
                .client
                .update_item()
                .table_name(&self.name)
                .set_key(Some(serializer::key(key)))
                .update_expression(expression)
                .condition_expression(condition)
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(Some(values))
                .return_values(ReturnValue::AllNew)
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
                .await;
            match result {
                Ok(output) => Ok(output.attributes.unwrap_or_default()),
                Err(e) => Err(self.fail("UpdateItem", e, update_kind).into_failure()),
            }
        })
    }

    fn delete_item<'a>(
        &'a self,
        key: &'a str,
        conditions: Vec<Condition>,
    ) -> BoxFuture<'a, std::result::Result<(), Failure>> {
        Box::pin(async move {
            let mut expressions = Expressions::default();
            let lease_key = expressions.name(attr::LEASE_KEY);
            let all = expressions.conditions(&conditions);
            let condition =
                if all.is_empty() { String::new() } else { format!("attribute_not_exists({lease_key}) OR ({all})") };
            let mut request = self.client.delete_item().table_name(&self.name).set_key(Some(serializer::key(key)));
            if !condition.is_empty() {
                request = request
                    .condition_expression(condition)
                    .set_expression_attribute_names(Some(expressions.names))
                    .set_expression_attribute_values((!expressions.values.is_empty()).then_some(expressions.values))
                    .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
            }
            match request.send().await {
                Ok(_) => Ok(()),
                Err(e) => Err(self.fail("DeleteItem", e, delete_kind).into_failure()),
            }
        })
    }
}

/// Expression strings with every attribute name and value as a placeholder.
#[derive(Default)]
struct Expressions {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Expressions {
    fn name(&mut self, attribute: &str) -> String {
        let placeholder = format!("#{attribute}");
        self.names.insert(placeholder.clone(), attribute.to_owned());
        placeholder
    }

    fn value(&mut self, value: AttributeValue) -> String {
        let placeholder = format!(":v{}", self.values.len());
        self.values.insert(placeholder.clone(), value);
        placeholder
    }

    fn conditions(&mut self, conditions: &[Condition]) -> String {
        let parts: Vec<String> = conditions
            .iter()
            .map(|condition| match condition {
                Condition::Equals(attribute, value) => {
                    let (name, value) = (self.name(attribute), self.value(value.clone()));
                    format!("{name} = {value}")
                }
                Condition::NotExists(attribute) => format!("attribute_not_exists({})", self.name(attribute)),
                Condition::Exists(attribute) => format!("attribute_exists({})", self.name(attribute)),
            })
            .collect();
        parts.join(" AND ")
    }

    /// (update expression, condition expression, names, values)
    fn update(update: &Update) -> (String, String, HashMap<String, String>, HashMap<String, AttributeValue>) {
        let mut expressions = Expressions::default();
        let mut clauses = Vec::new();
        let set: Vec<String> = update
            .set
            .iter()
            .map(|(attribute, value)| format!("{} = {}", expressions.name(attribute), expressions.value(value.clone())))
            .collect();
        let remove: Vec<String> = update.remove.iter().map(|attribute| expressions.name(attribute)).collect();
        let add: Vec<String> = update
            .add
            .iter()
            .map(|(attribute, value)| format!("{} {}", expressions.name(attribute), expressions.value(value.clone())))
            .collect();
        for (keyword, parts) in [("SET", &set), ("REMOVE", &remove), ("ADD", &add)] {
            if !parts.is_empty() {
                clauses.push(format!("{keyword} {}", parts.join(", ")));
            }
        }
        let condition = expressions.conditions(&update.conditions);
        (clauses.join(" "), condition, expressions.names, expressions.values)
    }
}

/// A table that takes reads and writes.
fn usable(table: &TableDescription) -> bool {
    matches!(table.table_status(), Some(TableStatus::Active | TableStatus::Updating))
}

/// What a failed DynamoDB call means for the lease table.
enum Kind {
    /// The condition of a conditional write was false (with the item, when DynamoDB returned it).
    Condition(Option<Item>),
    /// The table does not exist.
    NotFound,
    /// `CreateTable` of a table that is already there or being created.
    InUse,
    AccessDenied,
    Throttled,
    /// May work if made again: server errors, timeouts, connection failures, write conflicts.
    Transient,
    /// Will fail again the same way: a bad request.
    Rejected,
    /// A code the SDK does not model; decided by [`kind_for_code`].
    Unmodeled,
}

/// Codes DynamoDB returns without a modeled error type
/// ([common errors](https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Programming.Errors.html)).
fn kind_for_code(code: Option<&str>, server_error: bool) -> Kind {
    match code {
        Some("AccessDeniedException") => Kind::AccessDenied,
        Some("ThrottlingException" | "Throttling" | "LimitExceededException" | "RequestLimitExceeded") => {
            Kind::Throttled
        }
        Some(
            "ValidationException"
            | "SerializationException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "MissingAuthenticationTokenException"
            | "IncompleteSignatureException",
        ) => Kind::Rejected,
        // Refreshed credentials may work next time.
        Some("ExpiredTokenException") => Kind::Transient,
        _ if server_error => Kind::Transient,
        _ => Kind::Rejected,
    }
}

fn update_kind(error: &UpdateItemError) -> Kind {
    match error {
        UpdateItemError::ConditionalCheckFailedException(e) => Kind::Condition(e.item.clone()),
        UpdateItemError::ResourceNotFoundException(_) => Kind::NotFound,
        UpdateItemError::ProvisionedThroughputExceededException(_)
        | UpdateItemError::RequestLimitExceeded(_)
        | UpdateItemError::ThrottlingException(_) => Kind::Throttled,
        UpdateItemError::InternalServerError(_)
        | UpdateItemError::TransactionConflictException(_)
        | UpdateItemError::ReplicatedWriteConflictException(_) => Kind::Transient,
        UpdateItemError::ItemCollectionSizeLimitExceededException(_) => Kind::Rejected,
        _ => Kind::Unmodeled,
    }
}

fn put_kind(error: &PutItemError) -> Kind {
    match error {
        PutItemError::ConditionalCheckFailedException(e) => Kind::Condition(e.item.clone()),
        PutItemError::ResourceNotFoundException(_) => Kind::NotFound,
        PutItemError::ProvisionedThroughputExceededException(_)
        | PutItemError::RequestLimitExceeded(_)
        | PutItemError::ThrottlingException(_) => Kind::Throttled,
        PutItemError::InternalServerError(_)
        | PutItemError::TransactionConflictException(_)
        | PutItemError::ReplicatedWriteConflictException(_) => Kind::Transient,
        PutItemError::ItemCollectionSizeLimitExceededException(_) => Kind::Rejected,
        _ => Kind::Unmodeled,
    }
}

fn delete_kind(error: &DeleteItemError) -> Kind {
    match error {
        DeleteItemError::ConditionalCheckFailedException(e) => Kind::Condition(e.item.clone()),
        DeleteItemError::ResourceNotFoundException(_) => Kind::NotFound,
        DeleteItemError::ProvisionedThroughputExceededException(_)
        | DeleteItemError::RequestLimitExceeded(_)
        | DeleteItemError::ThrottlingException(_) => Kind::Throttled,
        DeleteItemError::InternalServerError(_)
        | DeleteItemError::TransactionConflictException(_)
        | DeleteItemError::ReplicatedWriteConflictException(_) => Kind::Transient,
        DeleteItemError::ItemCollectionSizeLimitExceededException(_) => Kind::Rejected,
        _ => Kind::Unmodeled,
    }
}

fn get_kind(error: &GetItemError) -> Kind {
    match error {
        GetItemError::ResourceNotFoundException(_) => Kind::NotFound,
        GetItemError::ProvisionedThroughputExceededException(_)
        | GetItemError::RequestLimitExceeded(_)
        | GetItemError::ThrottlingException(_) => Kind::Throttled,
        GetItemError::InternalServerError(_) => Kind::Transient,
        _ => Kind::Unmodeled,
    }
}

fn scan_kind(error: &ScanError) -> Kind {
    match error {
        ScanError::ResourceNotFoundException(_) => Kind::NotFound,
        ScanError::ProvisionedThroughputExceededException(_)
        | ScanError::RequestLimitExceeded(_)
        | ScanError::ThrottlingException(_) => Kind::Throttled,
        ScanError::InternalServerError(_) => Kind::Transient,
        _ => Kind::Unmodeled,
    }
}

fn describe_kind(error: &DescribeTableError) -> Kind {
    match error {
        DescribeTableError::ResourceNotFoundException(_) => Kind::NotFound,
        DescribeTableError::InternalServerError(_) => Kind::Transient,
        _ => Kind::Unmodeled,
    }
}

fn create_kind(error: &CreateTableError) -> Kind {
    match error {
        CreateTableError::ResourceInUseException(_) => Kind::InUse,
        CreateTableError::LimitExceededException(_) => Kind::Throttled,
        CreateTableError::InternalServerError(_) => Kind::Transient,
        _ => Kind::Unmodeled,
    }
}

/// A failed call, classified.
enum Failed {
    Condition(Option<Item>),
    InUse,
    Error(Error),
}

impl Failed {
    /// For calls where a failed condition or "in use" cannot happen (no condition, no create).
    fn into_error(self) -> Error {
        match self {
            Failed::Error(error) => error,
            Failed::Condition(_) | Failed::InUse => Error::Service {
                table: String::new(),
                action: "DynamoDB",
                code: "Unexpected".into(),
                message: "a condition failed on a call that has none".into(),
                retryable: false,
            },
        }
    }
}

impl Failed {
    fn into_failure(self) -> Failure {
        match self {
            Failed::Condition(item) => Failure::Condition(item),
            other => Failure::Error(other.into_error()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::model::{ExtendedSequenceNumber, Lease};
    use crate::lease::serializer::number;

    #[test]
    fn update_expressions_name_every_attribute() {
        let mut lease = Lease::new("shardId-000000000001", ExtendedSequenceNumber::LATEST);
        lease.owner = Some("w1".into());
        lease.counter = 7;
        let mut update = Update::default();
        update.set(attr::LEASE_COUNTER, number(8));
        update.remove(attr::CHECKPOINT_OWNER);
        update.add(attr::OWNER_SWITCHES, number(1));
        update.expect_counter(7);
        update.expect_owners(&lease);
        let (expression, condition, names, values) = Expressions::update(&update);
        assert_eq!(expression, "SET #leaseCounter = :v0 REMOVE #checkpointOwner ADD #ownerSwitchesSinceCheckpoint :v1");
        assert_eq!(condition, "#leaseCounter = :v2 AND #leaseOwner = :v3 AND attribute_not_exists(#checkpointOwner)");
        assert_eq!(names.len(), 4);
        assert_eq!(values[":v2"], AttributeValue::N("7".into()));
        assert_eq!(values[":v3"], AttributeValue::S("w1".into()));
    }

    #[test]
    fn access_denied_and_validation_are_not_retryable() {
        assert!(matches!(kind_for_code(Some("AccessDeniedException"), false), Kind::AccessDenied));
        assert!(matches!(kind_for_code(Some("ValidationException"), false), Kind::Rejected));
        assert!(matches!(kind_for_code(Some("ThrottlingException"), false), Kind::Throttled));
        assert!(matches!(kind_for_code(Some("Whatever"), true), Kind::Transient));
        assert!(matches!(kind_for_code(None, false), Kind::Rejected));
    }
}
