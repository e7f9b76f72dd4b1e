module cfwrap.test/gopeer

go 1.19
