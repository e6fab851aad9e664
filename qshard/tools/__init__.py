"""Commands around training: plan, doctor, report, bench-comm, init-tiny."""
