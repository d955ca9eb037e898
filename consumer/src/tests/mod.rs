//! Unit tests of the worker against in-process fakes ([`fakes`]), in paused time: leases taken,
//! expired and taken over, renewed, lost, handed off; children gated on their parents; batches
//! retried from their checkpoint. Time only moves when every task waits, so the KCL's 10 s
//! failover and 20 s taking interval take no wall-clock time, and each test runs the same way
//! every time.

mod fakes;
mod worker;
