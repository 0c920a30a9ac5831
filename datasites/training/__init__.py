"""Where approved jobs run at a site: the runtime syft calls, the site job, the sandbox, secure aggregation."""
