"""The networks: arc space, layers, the supernet, the fixed network, the controller, costs."""
