"""Recovery and checking of crash images: `runner` has the entry points, `outcome` the rules,
`mounts` the mount backends, `guest` the checker guest, `describe` what a failure looked like.

Deliberately empty of imports: the table of filesystems refers to `outcome`'s exit-code readers,
and importing this package must not drag the runner (and through it the guest layer) in with it.
"""
