//! Unit tests of the worker against in-process fakes, in paused time.
