"""Every schema and both databases of an atlas, behind one ``Atlas`` object."""

import os

# Lance logs a warning for every table created in a fresh folder (every table we write); this must
# be set before lancedb is first imported.
os.environ.setdefault("LANCE_LOG", "error")
