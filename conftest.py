"""Root conftest: loads the ws-harness pytest plugin for every test under this repository."""

pytest_plugins = ["ws_harness.plugin"]
