"""What an edit changed: `history` (recorded by the editor after each call) and `files` (edit patch files).

Deliberately empty: `files` reads the editor's state and the editor records into `history`, so importing this
package must not import either."""
