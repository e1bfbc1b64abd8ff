"""The bundled demo guest: built from Debian packages, used by `make demo` and the tests."""
