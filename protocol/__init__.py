"""What the coordinator (server/) and a hospital (client/) agree on, imported by both as equals:
the keys of every Flower message and what each may carry (``messages``), and the format of a
site's authentication key (``site_keys``). Neither side imports the other."""
