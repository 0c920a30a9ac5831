"""Running a datasite: its directory and config, the server process, syft patches, admin calls."""
