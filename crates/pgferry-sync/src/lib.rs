//! The sync engine (rounds at one source snapshot) arrives with the sync-engine issue.
