"""The per-node agent: joins the coordinator, runs this node's workers, reports what happens to them."""
