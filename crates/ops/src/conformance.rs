//! conformance (TODO)
