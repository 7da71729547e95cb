"""The Ray cluster: connecting, its shape (nodes up, node types the autoscaler may start), the
resource plan, Ray worker log set-up, and `posetune cluster check` for cluster-launcher files."""
