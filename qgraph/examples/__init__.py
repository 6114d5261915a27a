"""Example models: the test zoo and the bundled digits CNN."""
