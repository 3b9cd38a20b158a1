"""A PD cluster placed on Ray: the cluster file, the actors that run each process, the supervisor."""
