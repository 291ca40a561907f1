"""Every schema and both databases of an atlas, behind one ``Atlas`` object."""
