"""`mpp studio`: a layout editor in the browser (`app`), over a shot list (`shots`) and a session
that renders shots as `mpp generate` does (`session`)."""
