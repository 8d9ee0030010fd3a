"""Membership attacks and their shadow models: one module per attack, one for the scoring.

An attack turns a model and the attacker's data into a membership score per point;
`scoring` judges the scores. `loss` needs only the model; `lira` and `shokri` share
the shadow models of `shadows`; `ulira` audits a removal itself (shadows that unlearned
a point against shadows that never saw it). A new attack: a module here and a name in ATTACKS.
"""

ATTACKS = ("loss", "lira", "lira-online", "shokri", "u-lira")
