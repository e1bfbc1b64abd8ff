pytest_plugins = ["kvmsnap_demo.testing"]
