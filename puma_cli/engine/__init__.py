"""The one place that knows about Hessians: derivatives of the training loss, inverse
solves, and the cached criterion direction v = H^-1 grad C."""
