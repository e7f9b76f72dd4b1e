"""Cluster plans: every region, node and operator of a Nomad cluster from one TOML file.

``model`` reads and checks the plan; ``layout`` says where each thing lives in the output tree;
``state`` is the tree's manifest; ``diff`` compares the plan with the tree; ``apply`` carries
the actions out; ``rotation`` holds the CA rotation phases; ``status`` reports on a tree.
"""
