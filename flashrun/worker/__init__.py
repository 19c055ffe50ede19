"""The library training scripts import: liveness, step counting and collective tracking (more in later parts)."""
