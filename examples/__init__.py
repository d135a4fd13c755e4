"""Examples of using dmeta from outside its package (see the README's "Your own task family")."""
