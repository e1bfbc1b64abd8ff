pytest_plugins = ["kvmsnap_plugin.testing"]
