"""The running node: the sync cycle, the service, its checks and views."""
