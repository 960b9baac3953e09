"""Training and evaluation of the node's models, and the synthetic chest phantoms they can learn from."""
