"""Where approved jobs train: the runtime syft calls, the site job, DP-SGD engines, noise, the sandbox."""
