"""Planning: the resolver's rules, the budget search and the estimates that turn a spec and an
inventory into a plan."""
