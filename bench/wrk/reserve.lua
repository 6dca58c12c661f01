local body = '{"feature":"checkin_draft"}'
function request()
  return wrk.format("POST", "/v1/coaches/" .. coach() .. "/reservations", headers, body)
end
