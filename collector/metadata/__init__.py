"""Who produced the data: host, process, cgroup -> resource and point attributes."""
