//! Delta capture.
