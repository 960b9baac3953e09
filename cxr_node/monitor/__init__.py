"""Performance over time: what the model found on the site's own patients, per period, against their outcomes.

``cases`` reads a period from the store and joins the outcomes; ``drift`` holds the distribution tests (PSI, KS);
``figures`` computes every figure of a period; ``report`` writes ``cxr-node report``'s folder; ``watch`` is the
sender's monitoring job (gauges and alarms). Pure numpy for the maths.
"""
