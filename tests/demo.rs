//! `pgferry demo`, the README's first command, runs to the end on a small data set: a whole
//! migration under a writer, reported step by step, old and new equal, clusters removed.

mod common;

use common::pgferry;

#[test]
fn the_demo_migrates_under_load_and_reports_the_outage() {
    let run = pgferry(&["demo", "--rows", "5000", "--rate", "100"]).expect(0);
    for needle in [
        "pgferry install",
        "pg_dump",
        "pgferry clean",
        "pgferry sync",
        "pgferry cutover",
        "--reverse",
        "write outage:",
        "old and new are equal",
        "pgferry verify",
    ] {
        assert!(
            run.stdout.contains(needle),
            "{needle} missing:\n{}",
            run.stdout
        );
    }
    assert!(
        !run.stdout.contains('\u{1b}'),
        "escape codes when not on a terminal"
    );
}
