"""The derivative quantities, one module each: what it carries down (or up) the network, its driver, its fallback."""
