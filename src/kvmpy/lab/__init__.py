"""Studies that run many measured configurations and write a report (`kvmpy lab ...`)."""
