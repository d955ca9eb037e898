//! An in-memory [`ItemStore`] for unit tests: the lease table's items in a map, with the same
//! conditional writes DynamoDB applies (the conditions come from
//! [`LeaseTable`](crate::lease::LeaseTable), as for the real table), an [`Outage`] switch that
//! makes its calls fail as an unreachable DynamoDB's would, and a latency: each call then takes
//! effect that long after it is made (in a test's paused time), so workers interleave their calls
//! as they do against DynamoDB instead of each finishing its round in one poll.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::error::{Error, Result};
use crate::lease::item_store::{Condition, Failure, ItemStore, ScanPage, Update};
use crate::lease::serializer::{self, Item, attr};
use crate::lease::{Lease, TableSetup};

/// The items of one lease table, by key.
#[derive(Debug, Default)]
pub(crate) struct MemoryItems {
    items: Mutex<BTreeMap<String, Item>>,
    outage: AtomicU8,
    /// Microseconds each call waits before it takes effect.
    latency_micros: AtomicU64,
}

/// Which calls of a [`MemoryItems`] fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Outage {
    None = 0,
    /// Writes (puts, updates, deletes) fail; scans and gets work.
    Writes = 1,
    /// Every call fails.
    All = 2,
}

impl MemoryItems {
    /// From now on, the calls `outage` names fail with a retryable service error.
    pub(crate) fn set_outage(&self, outage: Outage) {
        self.outage.store(outage as u8, Ordering::Relaxed);
    }

    /// From now on, each call takes effect `latency` after it is made.
    pub(crate) fn set_latency(&self, latency: Duration) {
        self.latency_micros.store(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    async fn delay(&self) {
        let micros = self.latency_micros.load(Ordering::Relaxed);
        if micros > 0 {
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
    }

    /// The error of a call made during an outage that covers it.
    fn refused(&self, write: bool, action: &'static str) -> Option<Error> {
        let outage = self.outage.load(Ordering::Relaxed);
        (outage == Outage::All as u8 || (write && outage == Outage::Writes as u8)).then(|| Error::Service {
            table: "memory".into(),
            action,
            code: "ServiceUnavailable".into(),
            message: "the table does not answer (a test's outage)".into(),
            retryable: true,
        })
    }

    fn items(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Item>> {
        self.items.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lease under `key`, as the table holds it now.
    pub(crate) fn lease(&self, key: &str) -> Option<Lease> {
        self.items().get(key).and_then(|item| serializer::from_item(item).ok())
    }
}

fn key_of(item: &Item) -> String {
    match item.get(attr::LEASE_KEY) {
        Some(aws_sdk_dynamodb::types::AttributeValue::S(key)) => key.clone(),
        _ => String::new(),
    }
}

impl ItemStore for MemoryItems {
    fn ensure_table(&self, _wait: Duration) -> BoxFuture<'_, Result<TableSetup>> {
        Box::pin(async { Ok(TableSetup::Existed) })
    }

    fn scan(&self, _start: Option<Item>) -> BoxFuture<'_, Result<ScanPage>> {
        Box::pin(async move {
            self.delay().await;
            if let Some(error) = self.refused(false, "Scan") {
                return Err(error);
            }
            let items = self.items().values().cloned().collect();
            Ok(ScanPage { items, last_key: None })
        })
    }

    fn get_item<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Item>>> {
        Box::pin(async move {
            self.delay().await;
            if let Some(error) = self.refused(false, "GetItem") {
                return Err(error);
            }
            Ok(self.items().get(key).cloned())
        })
    }

    fn put_if_absent(&self, item: Item) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            self.delay().await;
            if let Some(error) = self.refused(true, "PutItem") {
                return Err(error);
            }
            let mut items = self.items();
            let key = key_of(&item);
            let created = !items.contains_key(&key);
            if created {
                items.insert(key, item);
            }
            Ok(created)
        })
    }

    fn update_item<'a>(&'a self, key: &'a str, update: Update) -> BoxFuture<'a, std::result::Result<Item, Failure>> {
        Box::pin(async move {
            self.delay().await;
            if let Some(error) = self.refused(true, "UpdateItem") {
                return Err(Failure::Error(error));
            }
            let mut items = self.items();
            let current = items.get(key);
            if update.conditions.iter().all(|c| c.holds(current)) {
                let mut item = current.cloned().unwrap_or_else(|| serializer::key(key));
                update.apply(&mut item);
                items.insert(key.to_owned(), item.clone());
                Ok(item)
            } else {
                Err(Failure::Condition(current.cloned()))
            }
        })
    }

    fn delete_item<'a>(
        &'a self,
        key: &'a str,
        conditions: Vec<Condition>,
    ) -> BoxFuture<'a, std::result::Result<(), Failure>> {
        Box::pin(async move {
            self.delay().await;
            if let Some(error) = self.refused(true, "DeleteItem") {
                return Err(Failure::Error(error));
            }
            let mut items = self.items();
            let current = items.get(key);
            match current {
                None => Ok(()),
                Some(_) if conditions.iter().all(|c| c.holds(current)) => {
                    items.remove(key);
                    Ok(())
                }
                Some(item) => Err(Failure::Condition(Some(item.clone()))),
            }
        })
    }
}
