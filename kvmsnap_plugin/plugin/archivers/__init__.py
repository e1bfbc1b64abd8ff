"""Built-in archivers: each is a kvmsnap plugin (see kvmsnap_plugin/hookspecs.py)."""
