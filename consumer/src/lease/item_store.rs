//! The DynamoDB item operations the lease table is built on, behind [`ItemStore`]: a consistent
//! scan, a consistent get, a put unless present, and conditional updates and deletes of named
//! attributes. [`LeaseTable`](crate::lease::LeaseTable) decides every write and its condition;
//! the store only carries it out, so the real table ([`DynamoDbItems`](super::dynamodb::DynamoDbItems))
//! and the in-memory fake of the unit tests apply the very same conditions.

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use futures::future::BoxFuture;

use crate::error::{Error, Result};
use crate::lease::model::Lease;
use crate::lease::serializer::{Item, attr, number};
use crate::lease::table::TableSetup;

/// A conditional write that was not made.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The condition was false; with the item as it is, when the store returned it.
    Condition(Option<Item>),
    Error(Error),
}

/// One condition on an item's attribute; a write's conditions must all hold.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Condition {
    Equals(String, AttributeValue),
    NotExists(String),
    Exists(String),
}

impl Condition {
    /// Whether the condition holds for `item` (an absent item has no attributes).
    #[cfg(test)]
    pub(crate) fn holds(&self, item: Option<&Item>) -> bool {
        let value = |name: &str| item.and_then(|item| item.get(name));
        match self {
            Condition::Equals(name, expected) => value(name) == Some(expected),
            Condition::NotExists(name) => value(name).is_none(),
            Condition::Exists(name) => value(name).is_some(),
        }
    }
}

/// An `UpdateItem` of named attributes: SET, REMOVE and ADD (of numbers) and its conditions.
#[derive(Debug, Clone, Default)]
pub(crate) struct Update {
    pub(crate) set: Vec<(String, AttributeValue)>,
    pub(crate) remove: Vec<String>,
    pub(crate) add: Vec<(String, AttributeValue)>,
    pub(crate) conditions: Vec<Condition>,
}

impl Update {
    pub(crate) fn set(&mut self, attribute: &str, value: AttributeValue) {
        self.set.push((attribute.to_owned(), value));
    }

    pub(crate) fn remove(&mut self, attribute: &str) {
        self.remove.push(attribute.to_owned());
    }

    pub(crate) fn add(&mut self, attribute: &str, value: AttributeValue) {
        self.add.push((attribute.to_owned(), value));
    }

    pub(crate) fn expect_equal_or_absent(&mut self, attribute: &str, value: Option<&str>) {
        self.conditions.push(match value {
            Some(value) => Condition::Equals(attribute.to_owned(), AttributeValue::S(value.to_owned())),
            None => Condition::NotExists(attribute.to_owned()),
        });
    }

    pub(crate) fn expect_counter(&mut self, counter: u64) {
        self.conditions.push(Condition::Equals(attr::LEASE_COUNTER.to_owned(), number(counter)));
    }

    /// `leaseOwner` and `checkpointOwner` as in `lease` (absent where it has none): the KCL's
    /// `getDynamoLeaseOwnerExpectation`.
    pub(crate) fn expect_owners(&mut self, lease: &Lease) {
        self.expect_equal_or_absent(attr::LEASE_OWNER, lease.owner.as_deref());
        self.expect_equal_or_absent(attr::CHECKPOINT_OWNER, lease.checkpoint_owner.as_deref());
    }

    pub(crate) fn expect_exists(&mut self) {
        self.conditions.push(Condition::Exists(attr::LEASE_KEY.to_owned()));
    }

    /// Applies the SET, REMOVE and ADD clauses to `item`, as DynamoDB does (ADD of a number to
    /// a missing attribute sets it).
    #[cfg(test)]
    pub(crate) fn apply(&self, item: &mut Item) {
        for (name, value) in &self.set {
            item.insert(name.clone(), value.clone());
        }
        for name in &self.remove {
            item.remove(name);
        }
        for (name, value) in &self.add {
            let sum = match (item.get(name), value) {
                (Some(AttributeValue::N(old)), AttributeValue::N(add)) => {
                    let old: u64 = old.parse().unwrap_or(0);
                    let add: u64 = add.parse().unwrap_or(0);
                    AttributeValue::N(old.saturating_add(add).to_string())
                }
                _ => value.clone(),
            };
            item.insert(name.clone(), sum);
        }
    }
}

/// One page of a scan.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScanPage {
    pub(crate) items: Vec<Item>,
    /// Where the next page starts; `None` after the last.
    pub(crate) last_key: Option<Item>,
}

/// The item operations of one lease table.
pub(crate) trait ItemStore: Send + Sync + std::fmt::Debug + 'static {
    /// Makes sure the table exists with the lease table's key, waiting up to `wait` for it to
    /// become usable.
    fn ensure_table(&self, wait: Duration) -> BoxFuture<'_, Result<TableSetup>>;

    /// One page of a consistent scan, from `start`.
    fn scan(&self, start: Option<Item>) -> BoxFuture<'_, Result<ScanPage>>;

    /// The item under `key` (consistent read).
    fn get_item<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Item>>>;

    /// Writes `item` unless one exists under its key; `false` when one does.
    fn put_if_absent(&self, item: Item) -> BoxFuture<'_, Result<bool>>;

    /// Applies `update` to the item under `key` if every condition holds; the item as it is after.
    fn update_item<'a>(&'a self, key: &'a str, update: Update) -> BoxFuture<'a, std::result::Result<Item, Failure>>;

    /// Deletes the item under `key` if it is absent or every condition holds.
    fn delete_item<'a>(
        &'a self,
        key: &'a str,
        conditions: Vec<Condition>,
    ) -> BoxFuture<'a, std::result::Result<(), Failure>>;
}
