"""One DP-SGD round on a table: the code a datasite runs on its private rows and a researcher's dry run on a mock, imported by both."""
